"""PCP -> DCP hand-off: move a context-parallel prefill's K/V rows into the DCP-layout paged cache.

After :func:`cpattn.pcp_ring_prefill` every rank holds the keys and values of ITS prompt rows
(the head-tail chunks of :func:`cpattn.pcp_partition`); decode wants each token on its DCP owner
rank ``(p // interleave) % N`` at its local position (:mod:`cpattn.layout`). The hand-off is one
all-to-all: each rank sends every row to the row's owner, and the owner writes it into its own
paged cache through its block table (:func:`cpattn.layout.slot_mapping`)::

    prefill rows of rank s  --(owner_rank(p))-->  rank d writes them at slot_mapping(p) of d's cache

Every rank knows every other rank's partition (it is a function of ``cu_seqlens``), so the send
and receive counts need no exchange: one agreement (refusal on every rank) and one all-to-all of
all the row tensors packed side by side (e.g. K and V of every layer at once).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _validate as V
from . import comm, layout
from .partition import _partition, check_cu_seqlens

__all__ = ["pcp_to_dcp_handoff", "handoff_routes"]

OP = "pcp_to_dcp_handoff"


def handoff_routes(cu_seqlens, world_size: int, rank: int, interleave: int = 1, context_lens=None):
    """Who sends what to whom, for ``rank`` (host arithmetic only, the same on every rank).

    Returns ``(send_order [Tr] int64, send_counts [N], recv_positions [R] int64, recv_requests [R]
    int64, recv_counts [N])``: ``rows[send_order]`` are this rank's rows grouped by owner rank
    (stable, owner 0 first), ``send_counts[j]`` of them go to rank ``j``; the ``R`` rows received
    (from rank 0 first) have the GLOBAL positions ``recv_positions`` (context included) in the
    requests ``recv_requests``. ``context_lens``: sequence of ints or None (zeros).
    """
    cu = check_cu_seqlens(OP, cu_seqlens)
    layout.check_layout(world_size, interleave, rank=rank)
    B = len(cu) - 1
    ctx = torch.zeros(B, dtype=torch.int64) if context_lens is None else torch.tensor(list(context_lens), dtype=torch.int64)
    bounds = torch.tensor(cu, dtype=torch.int64)

    def rows_of(s):
        part = _partition(cu, world_size, s)
        req = torch.searchsorted(bounds, part.index, right=True) - 1
        gpos = ctx[req] + part.positions
        return gpos, req, layout.owner_rank(gpos, world_size, interleave)

    mine = rows_of(rank)
    owner = mine[2]
    send_order = torch.argsort(owner, stable=True)
    send_counts = torch.bincount(owner, minlength=world_size).tolist()
    rp, rr, rc = [], [], []
    for s in range(world_size):
        g, q, o = mine if s == rank else rows_of(s)
        keep = torch.argsort(o, stable=True)
        keep = keep[o[keep] == rank]
        rp.append(g[keep])
        rr.append(q[keep])
        rc.append(int(keep.numel()))
    return send_order, send_counts, torch.cat(rp), torch.cat(rr), rc


def pcp_to_dcp_handoff(
    rows: torch.Tensor | Sequence[torch.Tensor],
    cu_seqlens,
    caches: torch.Tensor | Sequence[torch.Tensor],
    block_table: torch.Tensor,
    *,
    group,
    interleave: int = 1,
    context_lens: torch.Tensor | Sequence[int] | None = None,
) -> None:
    """Write this rank's PCP prefill rows into the owner ranks' DCP-layout paged caches.

    Every rank of ``group`` calls it collectively after a prefill over the same packed batch.

    Args:
        rows: one tensor or a list of tensors ``[Tr, *feat_i]``, this rank's rows in
            ``pcp_partition(cu_seqlens, N, rank).index`` order (the rows it fed to
            :func:`cpattn.pcp_ring_prefill`): e.g. ``[k, v]`` of every layer (``[Tr, Hkv, D]``) or
            MLA latent rows ``[Tr, 1, kv_lora_rank + rope_dim]``. One dtype and device for all.
        cu_seqlens: ``[B+1]`` int tensor or ints, the GLOBAL prompt batch (same on every rank).
        caches: one paged cache per row tensor, ``[num_blocks, block_size, *feat_i]`` with the rows'
            dtype and device, all with the same ``num_blocks`` and ``block_size``; this rank's
            shard, written in place.
        block_table: ``[B, max_blocks]`` int32/int64, this rank's blocks of each request's local
            sequence; room for ``local_len(context_lens[b] + L_b)`` tokens (e.g. from
            :func:`cpattn.layout.allocate_block_table`).
        group: the CP group (PCP and DCP over the same ranks); None: the default group, or one
            process when ``torch.distributed`` is not initialised.
        interleave: the DCP interleave size; divides ``block_size``.
        context_lens: ``[B]`` tokens already cached before each prompt (prefix caching, chunked
            prefill): prompt position ``p`` of request ``b`` is global position
            ``context_lens[b] + p``. None: 0.

    Writes row ``i`` of global position ``p`` to slot ``slot_mapping(p)`` of its owner rank
    ``(p // interleave) % N``. Communication: one all-to-all of ``Tr x sum(feat)`` elements per rank
    (the rows a rank owns itself are copied, not sent); no collective at world size 1. The PCP and
    DCP groups are the same ranks in the same order (a deployment whose PCP and DCP groups differ
    needs another routing; not provided).

    Raises:
        TypeError / ValueError naming the argument, on EVERY rank (through
        :func:`cpattn.comm.agree`) when any rank's input is bad or ranks disagree on
        ``cu_seqlens``, ``interleave``, ``context_lens``, the row shapes or dtype; nothing is
        written then.
    """
    if group is not None and not comm.is_process_group(group):
        raise TypeError(f"{OP}: group must be a torch.distributed ProcessGroup or None; got {type(group).__name__}")
    n, r = comm.world_size(group), comm.rank(group)
    rows_l = [rows] if isinstance(rows, torch.Tensor) else list(rows) if isinstance(rows, (list, tuple)) else rows
    caches_l = [caches] if isinstance(caches, torch.Tensor) else list(caches) if isinstance(caches, (list, tuple)) else caches
    err, plan = None, None
    try:
        plan = _plan(rows_l, cu_seqlens, caches_l, block_table, n, r, interleave, context_lens)
    except (TypeError, ValueError) as exc:
        err = exc
    comm.agree(OP, err, _fields(rows_l, cu_seqlens, interleave, context_lens), group)
    send_order, send_counts, slots, recv_counts = plan
    widths = [math.prod(x.shape[1:]) for x in rows_l]
    packed = torch.cat([x.reshape(x.shape[0], w) for x, w in zip(rows_l, widths)], dim=1)  # no -1: Tr may be 0
    packed = packed[send_order.to(packed.device)]
    got = comm.all_to_all_uneven(packed, send_counts, recv_counts, group)
    slots = slots.to(got.device)
    for piece, cache in zip(torch.split(got, widths, dim=1), caches_l):
        flat = cache.view(-1, *cache.shape[2:])
        flat[slots] = piece.reshape(piece.shape[0], *cache.shape[2:])


def _plan(rows, cu_seqlens, caches, block_table, n, r, interleave, context_lens):
    if not isinstance(rows, list) or not rows:
        raise TypeError(f"{OP}: rows must be a tensor or a non-empty list of tensors")
    if not isinstance(caches, list) or len(caches) != len(rows):
        raise ValueError(f"{OP}: caches must hold one paged cache per row tensor ({len(rows)}); got "
                         f"{len(caches) if isinstance(caches, list) else type(caches).__name__}")
    for i, (x, c) in enumerate(zip(rows, caches)):
        V.tensor(OP, f"rows[{i}]", x)
        V.tensor(OP, f"caches[{i}]", c)
        if x.dim() < 2 or c.dim() != x.dim() + 1 or tuple(c.shape[2:]) != tuple(x.shape[1:]):
            raise ValueError(f"{OP}: caches[{i}] must be [num_blocks, block_size, {', '.join(map(str, x.shape[1:]))}] "
                             f"for rows[{i}] {tuple(x.shape)} (rows need at least 2 dims); got {tuple(c.shape)}")
        if tuple(c.shape[:2]) != tuple(caches[0].shape[:2]):
            raise ValueError(f"{OP}: every cache must have caches[0]'s [num_blocks, block_size] "
                             f"{tuple(caches[0].shape[:2])}; caches[{i}] has {tuple(c.shape[:2])}")
        if x.shape[0] != rows[0].shape[0]:
            raise ValueError(f"{OP}: every row tensor must hold the same {rows[0].shape[0]} rows; rows[{i}] has {x.shape[0]}")
        if x.dtype != rows[0].dtype or c.dtype != rows[0].dtype:
            raise TypeError(f"{OP}: rows and caches must share one dtype ({rows[0].dtype}); rows[{i}] {x.dtype}, "
                            f"caches[{i}] {c.dtype}")
        if x.device != rows[0].device or c.device != rows[0].device:
            raise ValueError(f"{OP}: rows and caches must be on one device ({rows[0].device})")
    cu = check_cu_seqlens(OP, cu_seqlens)
    B = len(cu) - 1
    V.positive_int(OP, "interleave", interleave)
    bs = caches[0].shape[1]
    if bs == 0 or bs % interleave:
        raise ValueError(f"{OP}: interleave ({interleave}) must divide the cache block_size ({bs})")
    V.tensor(OP, "block_table", block_table, dim=2, dtypes=V.INDEX_DTYPES)
    if block_table.shape[0] != B:
        raise ValueError(f"{OP}: block_table must have one row per request ({B}); got {tuple(block_table.shape)}")
    ctx = _context(context_lens, B)
    want = _partition(cu, n, r).num_tokens
    if rows[0].shape[0] != want:
        raise ValueError(f"{OP}: rank {r} of {n} holds {want} rows of this batch (pcp_partition(cu_seqlens, {n}, {r})); "
                         f"rows have {rows[0].shape[0]}")
    lens = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.int64)
    local = layout.dcp_local_seq_lens(lens + torch.tensor(ctx, dtype=torch.int64), n, r, interleave)
    cap = block_table.shape[1] * bs
    for b, ln in enumerate(local.tolist()):
        if ln > cap:
            raise ValueError(f"{OP}: request {b} puts {ln} tokens on rank {r} but block_table has room for {cap} "
                             f"({block_table.shape[1]} blocks x {bs}); allocate more blocks")
    send_order, send_counts, rpos, rreq, recv_counts = handoff_routes(cu, n, r, interleave, ctx)
    table = block_table.to(torch.int64).cpu()
    slots = layout.slot_mapping(rpos, rreq, table, bs, world_size=n, rank=r, interleave=interleave)
    if slots.numel():
        blocks = torch.div(slots, bs, rounding_mode="floor")
        if int(slots.min()) < 0 or int(blocks.max()) >= caches[0].shape[0]:
            bad = int(blocks.min()) if int(slots.min()) < 0 else int(blocks.max())
            raise ValueError(f"{OP}: block_table refers to block {bad}, outside the caches' {caches[0].shape[0]} blocks")
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError(f"{OP}: block_table maps two tokens to one cache slot (a block is shared by two requests)")
    return send_order, send_counts, slots, recv_counts


def _context(context_lens, B: int) -> list[int]:
    if context_lens is None:
        return [0] * B
    if isinstance(context_lens, torch.Tensor):
        V.tensor(OP, "context_lens", context_lens, dim=1, dtypes=V.INDEX_DTYPES)
        vals = [int(x) for x in context_lens.tolist()]
    else:
        vals = list(context_lens)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            raise TypeError(f"{OP}: context_lens must be an int tensor or a sequence of ints")
    if len(vals) != B or any(x < 0 for x in vals):
        raise ValueError(f"{OP}: context_lens must be {B} ints >= 0 (one per request); got {vals[:16]}")
    return vals


def _fields(rows, cu_seqlens, interleave, context_lens) -> dict:
    def safe(fn):
        try:
            return fn()
        except Exception:
            return "?"

    return {
        "cu_seqlens": safe(lambda: tuple(check_cu_seqlens(OP, cu_seqlens))),
        "interleave": safe(lambda: int(interleave)),
        "context_lens": safe(lambda: None if context_lens is None else tuple(int(x) for x in (
            context_lens.tolist() if isinstance(context_lens, torch.Tensor) else context_lens))),
        "row shapes (after the row dim) and dtype": safe(lambda: tuple((tuple(x.shape[1:]), str(x.dtype)) for x in rows)),
    }
