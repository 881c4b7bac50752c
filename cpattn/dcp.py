"""DCP (decode context parallel): decode attention over a KV cache sharded across ranks.

Layout: :mod:`cpattn.layout`; combine strategies and their bytes: :mod:`cpattn.dcp_combine`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _validate as V
from . import comm, dcp_combine, layout
from .backends import BackendError, select

__all__ = ["dcp_decode_attention"]

OP = "dcp_decode_attention"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dcp_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    group,
    query_start_loc: torch.Tensor | None = None,
    interleave: int = 1,
    scale: float | None = None,
    v_head_dim: int | None = None,
    heads: str = "replicated",
    combine: str | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Decode attention of ``q`` against a KV cache sharded over the ranks of ``group`` (DCP).

    Global position ``p`` of every request lives on rank ``(p // interleave) % N`` at local
    position ``(p // (N*interleave)) * interleave + p % interleave`` (:mod:`cpattn.layout`). Each
    rank attends its queries to its own shard, then the partial results are merged exactly with
    their log-sum-exp (:mod:`cpattn.dcp_combine`). Every rank of ``group`` must call it.

    Args:
        q: ``[T, Hq, Dqk]`` float32/bfloat16/float16 query tokens, grouped by request. With
            ``heads="replicated"`` every rank passes the same ``q`` with all ``Hq`` heads; with
            ``heads="sharded"`` rank ``i`` passes heads ``i*Hq/N .. (i+1)*Hq/N - 1`` only
            (``[T, Hq/N, Dqk]``, DCP inside a TP group) and the op gathers them.
        k_cache: ``[num_blocks, block_size, Hkv, Dqk]`` this rank's shard of the keys, dtype and
            device of ``q``; ``Hq % Hkv == 0`` (query head ``h`` uses KV head ``h // (Hq/Hkv)``).
        v_cache: ``[num_blocks, block_size, Hkv, Dv]`` this rank's values, or None for MLA: V is
            then the first ``v_head_dim`` channels of K (one latent KV head, e.g. 512 + 64).
        block_table: ``[B, max_blocks]`` int32 (or int64), rows index this rank's cache blocks
            for its local sequence of each request. Entries past a request's local length are
            never read.
        seq_lens: ``[B]`` int32 (or int64) GLOBAL lengths, query tokens included (the same on
            every rank).
        group: the DCP process group (``None``: the default group, or one process when
            ``torch.distributed`` is not initialised).
        query_start_loc: ``[B+1]`` int32 cumulative query-token counts (request ``b`` owns
            ``q[qsl[b]:qsl[b+1]]``, its last ``n_b`` tokens: speculative decoding, MTP, chunked
            prefill against cached context); None: one token per request (``T == B``).
        interleave: tokens per round-robin run; must divide ``block_size``.
        scale: softmax scale, default ``1/sqrt(Dqk)`` (pass the model's for MLA).
        v_head_dim: ``Dv`` for MLA (required when ``v_cache`` is None; ``<= Dqk``).
        heads: ``"replicated"`` or ``"sharded"`` (see ``q``).
        combine: ``"all_gather"``, ``"lse_reduce"`` or ``"all_to_all"`` (sharded only); None
            picks :func:`cpattn.dcp_combine.default_strategy` (by head mode and payload size).
            All give the same result up to rounding.
        return_lse: also return the LSE.
        backend: local-kernel backend (``"pytorch"``, ``"reference"``, ``"triton"``; None: automatic).

    Returns:
        ``out [T, Hq_out, Dv]`` in ``q``'s dtype, ``Hq_out = Hq`` (replicated) or ``Hq/N``
        (this rank's heads, sharded); with ``return_lse``, also ``lse [T, Hq_out]``: float32,
        natural log, token-major, over the keys at global positions ``<= P`` for a query at
        position ``P`` (the causal rule). A query that sees no key anywhere (not possible for a
        valid decode query) would get ``(0, -inf)``; on a rank where it sees no local key its
        partial is exactly the empty state ``(0, -inf)``, the identity of the merge.
        With ``heads="replicated"`` the results are bitwise identical on every rank.

    Raises:
        TypeError / ValueError naming the argument on EVERY rank (through
        :func:`cpattn.comm.agree`, never a hang) when any rank's input is bad or ranks disagree
        (shapes, dtypes, lengths, interleave, heads, combine, scale); nothing is written.
        :class:`cpattn.BackendError` when the requested backend cannot run the input.

    Reads ``seq_lens``, ``query_start_loc`` and the used block ids on the host (validation and
    chunk bounds), so the op is not CUDA-graph capturable. World size 1: no collective at all.

    NaN/inf: a query row that sees a NaN or inf (in its query, or a live cache entry it sees, on
    any rank) comes out NaN, ``out`` and ``lse``, on every rank. Forward only: no backward (a
    backward through the op raises).
    """
    if group is not None and not comm.is_process_group(group):
        raise TypeError(f"{OP}: group must be a torch.distributed ProcessGroup or None; got {type(group).__name__}")
    args = (q, k_cache, v_cache, block_table, seq_lens, query_start_loc, comm.group_name(group), interleave, scale,
            v_head_dim, heads, combine or "", backend)
    devices = {t.device for t in args[:6] if isinstance(t, torch.Tensor)}
    # Mixed devices (e.g. one tensor on "meta") would make the dispatcher pick another device's
    # kernel on this rank only; run the implementation directly so the error reaches every rank.
    op = torch.ops.cpattn.dcp_decode_attention if len(devices) <= 1 else run
    out, lse = op(*args)
    return (out, lse) if return_lse else out


@dataclass
class _Plan:
    world: int
    rank: int
    heads_total: int
    v_head_dim: int
    scale: float
    combine: str
    qsl: torch.Tensor
    visible: torch.Tensor
    max_query_len: int
    max_kv_len: int
    qsl_host: list  # query_start_loc on the host
    local_host: list  # this rank's local length of each request
    backend: object  # Backend running paged_attention
    merge_backend: object  # Backend running the combine's merge (None at world size 1)


def check_shapes(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, v_head_dim, heads, combine) -> int:
    """Local checks that need no tensor values (also the fake implementation's); returns Dv."""
    V.tensor(OP, "q", q, dim=3, dtypes=DTYPES)
    V.tensor(OP, "k_cache", k_cache, dim=4, dtypes=DTYPES)
    V.same(OP, "dtype", {"q": q, "k_cache": k_cache}, "dtype")
    named = {"q": q, "k_cache": k_cache}
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"{OP}: k_cache head dim ({k_cache.shape[3]}) must equal q's Dqk ({q.shape[2]})")
    if v_cache is None:
        if v_head_dim is None:
            raise ValueError(f"{OP}: v_head_dim is required when v_cache is None (MLA: V = first v_head_dim channels of K)")
        V.positive_int(OP, "v_head_dim", v_head_dim)
        if v_head_dim > q.shape[2]:
            raise ValueError(f"{OP}: v_head_dim ({v_head_dim}) must be <= Dqk ({q.shape[2]}) when v_cache is None")
        dv = v_head_dim
    else:
        V.tensor(OP, "v_cache", v_cache, dim=4)
        V.same(OP, "dtype", {"k_cache": k_cache, "v_cache": v_cache}, "dtype")
        if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
            raise ValueError(f"{OP}: v_cache must be [num_blocks, block_size, Hkv, Dv] matching k_cache "
                             f"{tuple(k_cache.shape[:3])}; got {tuple(v_cache.shape)}")
        if v_head_dim is not None and v_head_dim != v_cache.shape[3]:
            raise ValueError(f"{OP}: v_head_dim ({v_head_dim}) disagrees with v_cache's last dim ({v_cache.shape[3]})")
        named["v_cache"] = v_cache
        dv = v_cache.shape[3]
    V.tensor(OP, "block_table", block_table, dim=2, dtypes=V.INDEX_DTYPES)
    V.tensor(OP, "seq_lens", seq_lens, dim=1, dtypes=V.INDEX_DTYPES)
    named.update(block_table=block_table, seq_lens=seq_lens)
    B = seq_lens.shape[0]
    if block_table.shape[0] != B:
        raise ValueError(f"{OP}: block_table must have one row per request ({B}); got {tuple(block_table.shape)}")
    if query_start_loc is None:
        if q.shape[0] != B:
            raise ValueError(f"{OP}: without query_start_loc, q must have one token per request ({B}); got T={q.shape[0]}")
    else:
        V.tensor(OP, "query_start_loc", query_start_loc, dim=1, dtypes=V.INDEX_DTYPES)
        if query_start_loc.shape[0] != B + 1:
            raise ValueError(f"{OP}: query_start_loc must be [B+1] = [{B + 1}]; got {tuple(query_start_loc.shape)}")
        named["query_start_loc"] = query_start_loc
    V.same_device(OP, named)
    if heads not in ("replicated", "sharded"):
        raise ValueError(f"{OP}: heads must be 'replicated' or 'sharded'; got {heads!r}")
    if combine and combine not in dcp_combine.allowed(heads):
        raise ValueError(f"{OP}: combine={combine!r} is not available with heads={heads!r}; choose one of "
                         f"{dcp_combine.allowed(heads)} (or None for the default)")
    return dv


def plan(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, interleave, scale, v_head_dim, heads,
         combine, backend, group) -> _Plan:
    """All local validation (raises before any collective) and the derived metadata."""
    dv = check_shapes(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, v_head_dim, heads, combine)
    n, r = comm.world_size(group), comm.rank(group)
    V.positive_int(OP, "interleave", interleave)
    NB, bs, hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    if bs % interleave:
        raise ValueError(f"{OP}: interleave ({interleave}) must divide the cache block_size ({bs}); use 1 or {bs}")
    h = q.shape[1] * (n if heads == "sharded" else 1)
    if hkv == 0 or h % hkv:
        what = f"{q.shape[1]} per rank x {n} ranks = {h}" if heads == "sharded" else str(h)
        raise ValueError(f"{OP}: query heads ({what}) must be a multiple of k_cache's KV heads ({hkv})")
    sc = V.scale_value(OP, scale, q.shape[2])
    T, B = q.shape[0], seq_lens.shape[0]
    lens = [int(x) for x in seq_lens.tolist()]
    qsl_t = (torch.arange(B + 1, dtype=torch.int64, device=q.device) if query_start_loc is None
             else query_start_loc.to(torch.int64))
    qsl = [int(x) for x in qsl_t.tolist()]
    if qsl[0] != 0 or qsl[-1] != T or any(b < a for a, b in zip(qsl, qsl[1:])):
        raise ValueError(f"{OP}: query_start_loc must start at 0, never decrease and end at T={T}; got {qsl}")
    for b, L in enumerate(lens):
        nq = qsl[b + 1] - qsl[b]
        if L < nq:
            raise ValueError(f"{OP}: seq_lens[{b}]={L} is shorter than its {nq} query token(s); seq_lens are GLOBAL "
                             f"lengths including the query tokens")
    local = layout.dcp_local_seq_lens(torch.tensor(lens, dtype=torch.int64), n, r, interleave).tolist()
    cap = block_table.shape[1] * bs
    for b, ln in enumerate(local):
        if ln > cap:
            raise ValueError(
                f"{OP}: seq_lens[{b}]={lens[b]} puts {ln} tokens on rank {r} of {n} (interleave {interleave}) but "
                f"block_table has room for {cap} (max_blocks {block_table.shape[1]} x block_size {bs}); lengths "
                f"beyond the block table, or a cache sharded for a different world size")
    used = [-(-ln // bs) for ln in local]
    if any(used):
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        mask = cols[None, :] < torch.tensor(used, device=block_table.device)[:, None]
        ids = block_table[mask]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= NB:
            raise ValueError(f"{OP}: block_table refers to block {lo if lo < 0 else hi}, outside k_cache's "
                             f"{NB} blocks")
    pos, _ = layout.query_positions(seq_lens, qsl_t, T)
    visible = layout.dcp_local_seq_lens(pos + 1, n, r, interleave)
    q_like = q if h == q.shape[1] else q.new_empty(T, h, q.shape[2])  # the kernel sees all h heads
    be = select("paged_attention", backend, dict(
        q=q_like, k_cache=k_cache, v_cache=v_cache, block_table=block_table, query_start_loc=qsl_t, visible_lens=visible,
        scale=sc, v_head_dim=dv, max_query_len=0, max_kv_len=0))
    merge_be = None
    if n > 1:  # pick the merge backend now: refuse before any collective, not between two
        s = h // n if heads == "sharded" else h
        o = q.new_empty(T, s, dv)  # the merge's real shapes and layout (small: decode tokens)
        lz = q.new_empty(T, s, dtype=torch.float32)
        merge_be = select("merge", backend, {"outs": [o] * n, "lses": [lz] * n, "out": o, "out_lse": lz})
    strategy = combine or dcp_combine.default_strategy(heads, n, T, h, dv, q.dtype)
    return _Plan(n, r, h, dv, sc, strategy, qsl_t, visible, max((b - a for a, b in zip(qsl, qsl[1:])), default=0),
                 max(local, default=0), qsl, local, be, merge_be)


def run(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, group_name_: str, interleave, scale,
        v_head_dim, heads, combine, backend):
    """The implementation behind ``torch.ops.cpattn.dcp_decode_attention``."""
    group = comm.resolve_group(group_name_)
    err, p = None, None
    try:
        p = plan(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, interleave, scale, v_head_dim,
                 heads, combine, backend, group)
    except (TypeError, ValueError, BackendError) as exc:
        err = exc
    comm.agree(OP, err, _fields(q, k_cache, v_cache, seq_lens, query_start_loc, interleave, heads, combine, p), group)
    T, hq_out = q.shape[0], q.shape[1]
    if T == 0:
        return (torch.zeros(0, hq_out, p.v_head_dim, dtype=q.dtype, device=q.device),
                torch.zeros(0, hq_out, dtype=torch.float32, device=q.device))
    q_all = dcp_combine.gather_heads(q, group) if heads == "sharded" else q
    out, lse = local_attention(p, q_all, k_cache, v_cache, block_table)
    return dcp_combine.combine(out, lse, strategy=p.combine, heads=heads, group=group, backend=p.merge_backend)


def local_attention(p: _Plan, q, k_cache, v_cache, block_table) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial ``(out [T, H, Dv], lse [T, H])``: one kernel call, or one per bucket of
    requests with similar query counts (``n_b`` in ``[2^(k-1), 2^k)``) when padding every request
    to the longest would more than double the work (decode tokens batched with a long chunk)."""
    kw = dict(k_cache=k_cache, v_cache=v_cache, scale=p.scale, v_head_dim=p.v_head_dim)
    T = q.shape[0]
    nq = [b - a for a, b in zip(p.qsl_host, p.qsl_host[1:])]
    if len(nq) * p.max_query_len <= 2 * T:
        return p.backend.run("paged_attention", q=q, block_table=block_table, query_start_loc=p.qsl,
                             visible_lens=p.visible, max_query_len=p.max_query_len, max_kv_len=p.max_kv_len, **kw)
    out = q.new_zeros(T, q.shape[1], p.v_head_dim)
    lse = torch.full((T, q.shape[1]), float("-inf"), dtype=dcp_combine.partial_dtype(q.dtype), device=q.device)
    buckets: dict[int, list[int]] = {}
    for b, n in enumerate(nq):
        if n:
            buckets.setdefault(n.bit_length(), []).append(b)
    for reqs in buckets.values():
        tok = torch.cat([torch.arange(p.qsl_host[b], p.qsl_host[b + 1]) for b in reqs]).to(q.device)
        sub_n = [nq[b] for b in reqs]
        o, l = p.backend.run(
            "paged_attention", q=q[tok], block_table=block_table[torch.tensor(reqs, device=block_table.device)],
            query_start_loc=torch.tensor([0] + sub_n, device=q.device).cumsum(0), visible_lens=p.visible[tok],
            max_query_len=max(sub_n), max_kv_len=max(p.local_host[b] for b in reqs), **kw)
        out[tok] = o
        lse[tok] = l.to(lse.dtype)  # a kernel may return a float32 LSE for float32 queries
    return out, lse


def _fields(q, k_cache, v_cache, seq_lens, query_start_loc, interleave, heads, combine, p) -> dict:
    """What every rank must agree on (safe to build from invalid input)."""
    def shape(x):
        return tuple(x.shape) if isinstance(x, torch.Tensor) else None

    def values(x):
        return x.tolist() if isinstance(x, torch.Tensor) and x.dim() == 1 else None

    return {
        "q shape [T, heads, Dqk] (heads='sharded': each rank passes Hq/N heads, Hq divisible by N)": shape(q),
        "q dtype": str(getattr(q, "dtype", None)),
        "k_cache [block_size, Hkv, Dqk]": shape(k_cache)[1:] if shape(k_cache) else None,
        "v head dim": None if p is None else p.v_head_dim,
        "seq_lens": values(seq_lens),
        "query_start_loc": values(query_start_loc),
        "interleave": interleave,
        "heads": heads,
        "combine": None if p is None else p.combine,
        "scale": None if p is None else p.scale,
        "mla (v_cache is None)": v_cache is None,
    }
