"""DCP layout maths: which rank holds which token of a request's KV cache, and where.

Pure functions over tensors (no communication, no host sync unless noted). With ``world_size``
ranks ``N`` and interleave size ``I`` (``cp_kv_cache_interleave_size``), tokens are dealt out in
runs of ``I`` consecutive positions, round robin::

    owner(p)     = (p // I) % N
    local_pos(p) = (p // (N * I)) * I + p % I

    N = 2, I = 1:  position  0 1 2 3 4 5 6 7        N = 2, I = 2:  position  0 1 2 3 4 5 6 7
                   rank      0 1 0 1 0 1 0 1                       rank      0 0 1 1 0 0 1 1
                   local     0 0 1 1 2 2 3 3                       local     0 1 0 1 2 3 2 3

Each rank stores its tokens as an ordinary per-request sequence (local positions 0, 1, 2, ...)
in its own paged cache, through its own block table. The local length of a request of global
length ``L`` on rank ``r`` is ``base + clamp(L - base*N - r*I, 0, I)`` with
``base = (L // (N*I)) * I``. A query at global position ``P`` sees keys ``<= P``: on rank ``r``
exactly the first ``local_len(P + 1, r)`` local keys.

``block_size % interleave == 0`` is required, so that a run of ``I`` tokens never straddles two
blocks (with ``I == block_size`` whole blocks live on one rank and can be moved as they are).

Input checks: positions, lengths and indices must be integer tensors (TypeError otherwise) and
``>= 0``; every function raises a ValueError naming the argument for a negative value, a
request index or block column outside the block table, and the like. Values are checked on CPU
tensors (free there); on an accelerator such a check would cost a host sync, so values there
are the caller's responsibility (types, dims and shapes are still checked).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "check_layout",
    "owner_rank",
    "local_position",
    "dcp_local_seq_lens",
    "dcp_local_seq_lens_all",
    "query_positions",
    "slot_mapping",
    "allocate_block_table",
    "ShardedCache",
    "shard_kv",
    "shard_paged_cache",
]


def _pos_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"layout: {name} must be an int; got {type(x).__name__}")
    if x <= 0:
        raise ValueError(f"layout: {name} must be > 0; got {x}")
    return x


def _index(name: str, x, *, dim: int | None = None, fn: str = "layout") -> torch.Tensor:
    """An integer tensor of values ``>= 0`` (values checked on CPU only: no host sync)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be an integer torch.Tensor; got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must have an integer dtype (int32/int64); got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{fn}: {name} must have {dim} dim(s); got shape {tuple(x.shape)}")
    if x.device.type == "cpu" and x.numel() and int(x.min()) < 0:
        raise ValueError(f"{fn}: {name} must be >= 0; got {int(x.min())}")
    return x


def _cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def check_layout(world_size: int, interleave: int, block_size: int | None = None, rank: int | None = None) -> None:
    """Validate layout parameters: positive ints, ``0 <= rank < world_size``,
    ``block_size % interleave == 0``. Raises TypeError/ValueError naming the argument."""
    _pos_int("world_size", world_size)
    _pos_int("interleave", interleave)
    if block_size is not None:
        _pos_int("block_size", block_size)
        if block_size % interleave:
            raise ValueError(
                f"layout: block_size ({block_size}) must be a multiple of interleave ({interleave}); "
                f"use an interleave that divides the block size (e.g. 1 or {block_size})"
            )
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"layout: rank must be an int; got {type(rank).__name__}")
        if not 0 <= rank < world_size:
            raise ValueError(f"layout: rank must be in [0, {world_size}); got {rank}")


def owner_rank(positions: torch.Tensor, world_size: int, interleave: int = 1) -> torch.Tensor:
    """Rank holding each global position: ``(p // I) % N``. ``positions`` int tensor (>= 0);
    returns the same shape and dtype."""
    check_layout(world_size, interleave)
    _index("positions", positions, fn="owner_rank")
    return torch.div(positions, interleave, rounding_mode="floor") % world_size


def local_position(positions: torch.Tensor, world_size: int, interleave: int = 1) -> torch.Tensor:
    """Position of each global token in its owner's local sequence:
    ``(p // (N*I)) * I + p % I``. Same shape and dtype as ``positions``."""
    check_layout(world_size, interleave)
    _index("positions", positions, fn="local_position")
    return torch.div(positions, world_size * interleave, rounding_mode="floor") * interleave + positions % interleave


def dcp_local_seq_lens(seq_lens: torch.Tensor, world_size: int, rank: int, interleave: int = 1) -> torch.Tensor:
    """Local lengths on ``rank`` of requests of global lengths ``seq_lens`` (any shape, int >= 0).

    ``base = (L // (N*I)) * I; local = base + clamp(L - base*N - rank*I, 0, I)``. Returns the
    shape and dtype of ``seq_lens``. Summed over ranks the local lengths give ``seq_lens``.
    """
    check_layout(world_size, interleave, rank=rank)
    _index("seq_lens", seq_lens, fn="dcp_local_seq_lens")
    base = torch.div(seq_lens, world_size * interleave, rounding_mode="floor") * interleave
    rem = seq_lens - base * world_size - rank * interleave
    return base + rem.clamp(0, interleave)


def dcp_local_seq_lens_all(seq_lens: torch.Tensor, world_size: int, interleave: int = 1) -> torch.Tensor:
    """Local lengths on every rank at once: ``[world_size, *seq_lens.shape]``, dtype of
    ``seq_lens``; row ``r`` equals ``dcp_local_seq_lens(seq_lens, world_size, r, interleave)``."""
    check_layout(world_size, interleave)
    _index("seq_lens", seq_lens, fn="dcp_local_seq_lens_all")
    ranks = torch.arange(world_size, dtype=seq_lens.dtype, device=seq_lens.device)
    ranks = ranks.view(world_size, *([1] * seq_lens.dim()))
    base = torch.div(seq_lens, world_size * interleave, rounding_mode="floor") * interleave
    rem = (seq_lens - base * world_size).unsqueeze(0) - ranks * interleave
    return base.unsqueeze(0) + rem.clamp(0, interleave)


def query_positions(
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor | None = None, num_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global positions and requests of the query tokens.

    Request ``b`` has ``n_b`` query tokens (from ``query_start_loc [B+1]``; None: one each) and
    they are its last ``n_b`` tokens, at ``seq_lens[b] - n_b .. seq_lens[b] - 1``. Returns
    ``(positions [T], req_indices [T])``, both int64. Pass ``num_tokens`` (``T``) to avoid a
    host sync. Requests need ``n_b <= seq_lens[b]`` (at least one token, the query itself, when
    ``query_start_loc`` is None).
    """
    fn = "query_positions"
    _index("seq_lens", seq_lens, dim=1, fn=fn)
    if num_tokens is not None and (isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0):
        raise (TypeError if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) else ValueError)(
            f"{fn}: num_tokens must be an int >= 0 or None; got {num_tokens!r}")
    lens = seq_lens.to(torch.int64)
    B = lens.shape[0]
    if query_start_loc is None:
        if _cpu(lens) and B and int(lens.min()) < 1:
            raise ValueError(f"{fn}: with one query per request every seq_lens entry must be >= 1; got {int(lens.min())}")
        if num_tokens is not None and num_tokens != B:
            raise ValueError(f"{fn}: num_tokens ({num_tokens}) must equal the number of requests ({B}) without "
                             f"query_start_loc")
        return lens - 1, torch.arange(B, device=lens.device)
    _index("query_start_loc", query_start_loc, dim=1, fn=fn)
    if query_start_loc.shape[0] != B + 1:
        raise ValueError(f"{fn}: query_start_loc must be [B+1] = [{B + 1}]; got {tuple(query_start_loc.shape)}")
    qsl = query_start_loc.to(torch.int64)
    n = qsl[1:] - qsl[:-1]
    if _cpu(qsl):
        if int(qsl[0]) != 0 or (B and int(n.min()) < 0):
            raise ValueError(f"{fn}: query_start_loc must start at 0 and never decrease; got {qsl.tolist()[:16]}")
        if num_tokens is not None and num_tokens != int(qsl[-1]):
            raise ValueError(f"{fn}: num_tokens ({num_tokens}) must equal query_start_loc[-1] ({int(qsl[-1])})")
        if _cpu(lens) and B and bool((n > lens).any()):
            b = int(torch.nonzero(n > lens)[0])
            raise ValueError(f"{fn}: request {b} has {int(n[b])} query tokens but seq_lens[{b}] = {int(lens[b])}; "
                             f"the query tokens are the last tokens of the request")
    req = torch.repeat_interleave(torch.arange(B, device=lens.device), n, output_size=num_tokens)
    j = torch.arange(req.shape[0], device=lens.device) - qsl[:-1][req]
    return lens[req] - n[req] + j, req


def slot_mapping(
    positions: torch.Tensor,
    req_indices: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    *,
    world_size: int,
    rank: int,
    interleave: int = 1,
) -> torch.Tensor:
    """Where ``rank`` writes newly computed tokens in its own paged cache.

    ``positions [T]``: global positions of the new tokens; ``req_indices [T]``: their request
    (row of ``block_table``); ``block_table [B, max_blocks]``: this rank's block table. Returns
    int64 ``[T]``: the flat slot ``block * block_size + offset`` in this rank's cache
    (``k_cache.view(-1, ...)``) for tokens this rank owns, ``-1`` for the others.
    """
    check_layout(world_size, interleave, block_size, rank)
    fn = "slot_mapping"
    _index("positions", positions, dim=1, fn=fn)
    _index("req_indices", req_indices, dim=1, fn=fn)
    _index("block_table", block_table, dim=2, fn=fn)
    if req_indices.shape != positions.shape:
        raise ValueError(f"{fn}: req_indices must have the shape of positions {tuple(positions.shape)}; "
                         f"got {tuple(req_indices.shape)}")
    pos = positions.to(torch.int64)
    mine = owner_rank(pos, world_size, interleave) == rank
    lp = local_position(pos, world_size, interleave)
    col = torch.where(mine, torch.div(lp, block_size, rounding_mode="floor"), torch.zeros_like(lp))
    if _cpu(req_indices) and req_indices.numel() and int(req_indices.max()) >= block_table.shape[0]:
        raise ValueError(f"{fn}: req_indices refers to request {int(req_indices.max())} but block_table has "
                         f"{block_table.shape[0]} rows")
    if _cpu(col) and col.numel() and int(col.max()) >= block_table.shape[1]:
        raise ValueError(f"{fn}: a position owned by rank {rank} needs block column {int(col.max())} but "
                         f"block_table has {block_table.shape[1]} columns (positions beyond the block table)")
    blocks = block_table.to(torch.int64)[req_indices.to(torch.int64), col]
    slots = blocks * block_size + lp % block_size
    return torch.where(mine, slots, torch.full_like(slots, -1))


def allocate_block_table(
    seq_lens: torch.Tensor,
    *,
    world_size: int,
    rank: int,
    block_size: int,
    interleave: int = 1,
    first_block: int = 0,
) -> tuple[torch.Tensor, int]:
    """A simple allocator: fresh, consecutive blocks on ``rank`` for requests that will reach
    GLOBAL lengths ``seq_lens [B]`` (capacity, e.g. prompt + new tokens).

    Request ``b`` gets ``ceil(local_len_b / block_size)`` blocks (``local_len`` from
    :func:`dcp_local_seq_lens`), numbered from ``first_block`` on, request after request.
    Returns ``(block_table [B, width] int32 on seq_lens' device, num_blocks)``: ``width`` is the most
    blocks ANY rank needs for any request (at least 1), so every rank's table has the same shape;
    entries past a request's blocks are 0 and never read. Reads ``seq_lens`` on the host.
    """
    check_layout(world_size, interleave, block_size, rank)
    lens = seq_lens.to(torch.int64).cpu()
    if lens.dim() != 1 or (lens < 0).any():
        raise ValueError(f"layout: seq_lens must be 1-D and >= 0; got {lens.tolist()[:16]}")
    need_all = (dcp_local_seq_lens_all(lens, world_size, interleave) + block_size - 1) // block_size  # [N, B]
    width = max(1, int(need_all.max()) if need_all.numel() else 1)
    need = need_all[rank]
    starts = first_block + torch.cumsum(need, 0) - need
    cols = torch.arange(width, dtype=torch.int64)
    table = torch.where(cols[None, :] < need[:, None], starts[:, None] + cols[None, :], torch.zeros_like(cols)[None, :])
    return table.to(torch.int32).to(seq_lens.device), int(need.sum())


class ShardedCache(NamedTuple):
    """One rank's cache: ``k_cache [num_blocks, block_size, Hkv, Dqk]``, ``v_cache
    [num_blocks, block_size, Hkv, Dv]`` (None for MLA), ``block_table [B, max_blocks]`` int32 and
    ``local_seq_lens [B]`` int32 (LOCAL lengths; the op takes the global ones)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor | None
    block_table: torch.Tensor
    local_seq_lens: torch.Tensor


def shard_kv(
    k: torch.Tensor,
    v: torch.Tensor | None,
    seq_lens: torch.Tensor,
    *,
    world_size: int,
    block_size: int,
    interleave: int = 1,
    spare_blocks: int = 0,
    generator: torch.Generator | None = None,
    fill: float = 0.0,
) -> list[ShardedCache]:
    """Shard plain per-request K/V into one paged cache per rank (for tests, benches, migration).

    ``k [sum(seq_lens), Hkv, Dqk]`` and ``v [sum(seq_lens), Hkv, Dv]`` (or None: MLA) hold the
    requests back to back; ``seq_lens [B]`` are their global lengths. Returns ``world_size``
    :class:`ShardedCache`, rank order. Every rank's block table has the same width (the most
    blocks any rank needs for any request, at least 1); entries past a request's blocks are 0.
    ``spare_blocks`` extra blocks are allocated per rank and filled with ``fill`` (e.g. NaN, to
    prove a kernel never reads them). With a ``generator`` the block ids are shuffled.
    Reads ``seq_lens`` on the host.
    """
    check_layout(world_size, interleave, block_size)
    fn = "shard_kv"
    _index("seq_lens", seq_lens, dim=1, fn=fn)
    if not isinstance(k, torch.Tensor) or (v is not None and not isinstance(v, torch.Tensor)):
        bad = k if not isinstance(k, torch.Tensor) else v
        raise TypeError(f"{fn}: k (and v unless None) must be torch.Tensor; got {type(bad).__name__}")
    if isinstance(spare_blocks, bool) or not isinstance(spare_blocks, int) or spare_blocks < 0:
        raise ValueError(f"{fn}: spare_blocks must be an int >= 0; got {spare_blocks!r}")
    lens = [int(x) for x in seq_lens.tolist()]
    if any(x < 0 for x in lens):  # seq_lens off CPU: read on the host here anyway
        raise ValueError(f"{fn}: seq_lens must be >= 0; got {min(lens)}")
    if k.dim() != 3 or k.shape[0] != sum(lens):
        raise ValueError(f"layout: k must be [sum(seq_lens)={sum(lens)}, Hkv, Dqk]; got {tuple(k.shape)}")
    if v is not None and (v.dim() != 3 or v.shape[0] != k.shape[0]):
        raise ValueError(f"layout: v must be [{k.shape[0]}, Hkv, Dv]; got {tuple(v.shape)}")
    starts = torch.tensor([0] + lens[:-1], dtype=torch.int64).cumsum(0) if lens else torch.zeros(0, dtype=torch.int64)
    local = dcp_local_seq_lens_all(torch.tensor(lens, dtype=torch.int64), world_size, interleave)
    need = (local + block_size - 1) // block_size  # [N, B]
    width = max(1, int(need.max()) if need.numel() else 1)
    B = len(lens)
    out = []
    for r in range(world_size):
        nblk = int(need[r].sum()) + spare_blocks
        perm = torch.randperm(nblk, generator=generator) if generator is not None else torch.arange(nblk)
        table = torch.zeros(B, width, dtype=torch.int32)
        caches = []
        for src in (k, v):
            if src is None:
                caches.append(None)
                continue
            caches.append(torch.full((nblk, block_size, *src.shape[1:]), fill, dtype=src.dtype, device=src.device))
        used = 0
        for b in range(B):
            nb, ln = int(need[r, b]), int(local[r, b])
            ids = perm[used:used + nb]
            used += nb
            table[b, :nb] = ids.to(torch.int32)
            if ln == 0:
                continue
            gpos = _global_positions_of_rank(ln, r, world_size, interleave) + starts[b]
            for cache, src in zip(caches, (k, v)):
                if cache is None:
                    continue
                flat = cache.view(nblk * block_size, *src.shape[1:])
                lp = torch.arange(ln)
                flat[ids.to(torch.int64)[lp // block_size] * block_size + lp % block_size] = src[gpos.to(src.device)]
        out.append(ShardedCache(caches[0], caches[1], table.to(k.device), local[r].to(torch.int32).to(k.device)))
    return out


def _global_positions_of_rank(local_len: int, rank: int, world_size: int, interleave: int) -> torch.Tensor:
    """Global positions of local positions ``0 .. local_len-1`` on ``rank`` (inverse layout)."""
    lp = torch.arange(local_len, dtype=torch.int64)
    return (lp // interleave) * (world_size * interleave) + rank * interleave + lp % interleave


def shard_paged_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    world_size: int,
    interleave: int = 1,
    block_size: int | None = None,
    **kwargs,
) -> list[ShardedCache]:
    """Shard a whole (unsharded) paged cache: ``k_cache [num_blocks, bs, Hkv, Dqk]``,
    ``v_cache`` alike (or None), ``block_table [B, max_blocks]``, ``seq_lens [B]`` global
    lengths. The per-rank caches use ``block_size`` (default: the source's ``bs``); other
    keyword arguments as in :func:`shard_kv`. Reads ``seq_lens`` on the host."""
    fn = "shard_paged_cache"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t is None and name == "v_cache":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be [num_blocks, block_size, Hkv, D]; got shape {tuple(t.shape)}")
    _index("block_table", block_table, dim=2, fn=fn)
    _index("seq_lens", seq_lens, dim=1, fn=fn)
    if block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"{fn}: block_table must have one row per request ({seq_lens.shape[0]}); "
                         f"got {tuple(block_table.shape)}")
    bs = k_cache.shape[1]
    lens = seq_lens.to(torch.int64).cpu()
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError(f"{fn}: seq_lens must be >= 0; got {int(lens.min())}")
    pieces_k, pieces_v = [], []
    for b, ln in enumerate(lens.tolist()):
        p = torch.arange(ln)
        if ln > block_table.shape[1] * bs:
            raise ValueError(f"layout: seq_lens[{b}]={ln} exceeds block_table capacity {block_table.shape[1] * bs}")
        ids = block_table[b].to(torch.int64).cpu()[: -(-ln // bs)]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
            raise ValueError(f"{fn}: block_table[{b}] refers to block {int(ids.max()) if int(ids.min()) >= 0 else int(ids.min())}, "
                             f"outside k_cache's {k_cache.shape[0]} blocks")
        slots = block_table[b].to(torch.int64).cpu()[p // bs] * bs + p % bs
        pieces_k.append(k_cache.reshape(-1, *k_cache.shape[2:])[slots.to(k_cache.device)])
        if v_cache is not None:
            pieces_v.append(v_cache.reshape(-1, *v_cache.shape[2:])[slots.to(v_cache.device)])
    empty_k = k_cache.new_empty(0, *k_cache.shape[2:])
    k = torch.cat(pieces_k) if pieces_k else empty_k
    v = None if v_cache is None else (torch.cat(pieces_v) if pieces_v else v_cache.new_empty(0, *v_cache.shape[2:]))
    return shard_kv(k, v, lens, world_size=world_size, block_size=block_size or bs, interleave=interleave, **kwargs)
