"""Cached context for PCP (prefix caching, chunked prefill): the prompt also attends to the
earlier tokens of each request, already sharded over the group in the DCP layout.

Request ``b`` has ``context_lens[b]`` cached tokens (global positions ``0 .. C_b - 1``) and its
prompt tokens follow them (prompt position ``p`` is global position ``C_b + p``). Every cached
token precedes every prompt token, so each prompt query sees the whole context of its request:
no mask inside the context part. Its attention is the exact LSE merge of two partials over
disjoint key sets::

    prompt part   : pcp_ring_prefill's ring / all-gather over the prompt's own keys (causal)
    context part  : cpattn.dcp_decode_attention over the DCP-sharded cache (every rank's shard)
    result        : merge_attn_states(prompt part, context part)   (float32 math, one rounding)

DCP decode wants the same queries on every rank (``heads="replicated"``). So the prompt queries
are all-gathered once, and each query with some context is a query of its request that sees all
``C_b`` cached tokens (on this rank: the first ``local_len(C_b)`` local keys), run through the DCP
plan machinery (:mod:`cpattn.dcp_meta`: host metadata staged in ``plan()``, one-token requests
in the kernel, no host sync at run time). Kernel calls and combines go in chunks of
:data:`CHUNK_TOKENS` queries (the same chunks on every rank, since ``cu_seqlens`` and
``context_lens`` are agreed) to bound the per-token block-table rows. The DCP combine merges the
ranks' partials; every rank keeps its own rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _validate as V
from . import comm

__all__ = ["PcpContext", "CHUNK_TOKENS"]

CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class PcpContext:
    """This rank's DCP-layout paged cache of the tokens cached before each request's prompt.

    Attributes:
        k_cache: ``[num_blocks, block_size, Hkv, Dqk]`` this rank's shard of the cached keys,
            dtype and device of the prompt's ``q`` (float32, bfloat16 or float16).
        v_cache: ``[num_blocks, block_size, Hkv, Dv]`` the cached values, or None (MLA: V is the
            first ``Dv`` channels of K, ``Dv`` taken from the prompt's ``v``).
        block_table: ``[B, max_blocks]`` int32/int64, this rank's blocks of each request's local
            (sharded) context sequence.
        context_lens: ``[B]`` int32/int64 GLOBAL cached lengths (0 allowed), the same on every rank.
        interleave: DCP interleave size (``cp_kv_cache_interleave_size``); divides ``block_size``.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor | None
    block_table: torch.Tensor
    context_lens: torch.Tensor
    interleave: int = 1


def check_caches(op: str, ctx, q, k, v) -> None:
    """The context caches against the prompt's ``q, k, v`` (dtype, device, heads, head dims): shapes
    only, no values read (also ``PcpPrefillPlan.run``'s check)."""
    V.tensor(op, "context.k_cache", ctx.k_cache, dim=4)
    if ctx.k_cache.dtype != q.dtype:
        raise TypeError(f"{op}: context.k_cache must have q's dtype {q.dtype}; got {ctx.k_cache.dtype}")
    if ctx.k_cache.device != q.device:
        raise ValueError(f"{op}: context.k_cache must be on q's device {q.device}; got {ctx.k_cache.device}")
    if tuple(ctx.k_cache.shape[2:]) != (k.shape[1], k.shape[2]):
        raise ValueError(f"{op}: context.k_cache must be [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}] "
                         f"(k's heads and head dim); got {tuple(ctx.k_cache.shape)}")
    if ctx.v_cache is not None:
        V.tensor(op, "context.v_cache", ctx.v_cache, dim=4)
        if ctx.v_cache.dtype != q.dtype:
            raise TypeError(f"{op}: context.v_cache must have q's dtype {q.dtype}; got {ctx.v_cache.dtype}")
        want = (*ctx.k_cache.shape[:3], v.shape[2])
        if tuple(ctx.v_cache.shape) != want:
            raise ValueError(f"{op}: context.v_cache must be {want} (k_cache's blocks, v's head dim); "
                             f"got {tuple(ctx.v_cache.shape)}")
    elif v.shape[2] > k.shape[2]:
        raise ValueError(f"{op}: context.v_cache=None reads V as the first Dv={v.shape[2]} channels of K, "
                         f"so Dv must be <= Dqk={k.shape[2]}")


def _check_tables(op: str, ctx: PcpContext, num_seqs: int) -> None:
    """``block_table`` and ``context_lens``: index tensors with one row per sequence."""
    V.tensor(op, "context.block_table", ctx.block_table, dim=2, dtypes=V.INDEX_DTYPES)
    V.tensor(op, "context.context_lens", ctx.context_lens, dim=1, dtypes=V.INDEX_DTYPES)
    for name, t in (("block_table", ctx.block_table), ("context_lens", ctx.context_lens)):
        if t.shape[0] != num_seqs:
            raise ValueError(f"{op}: context.{name} must have one row per sequence of cu_seqlens ({num_seqs}); "
                             f"got {t.shape[0]}")


def validate(op: str, ctx: PcpContext, q, k, v, num_seqs: int) -> tuple[int, ...]:
    """Local checks of the context against the prompt; returns ``context_lens`` as ints."""
    check_caches(op, ctx, q, k, v)
    _check_tables(op, ctx, num_seqs)
    lens = tuple(int(x) for x in ctx.context_lens.tolist())
    if any(x < 0 for x in lens):
        raise ValueError(f"{op}: context.context_lens must be >= 0; got {list(lens)[:16]}")
    V.positive_int(op, "context.interleave", ctx.interleave)
    return lens


def validate_static(op: str, ctx, num_seqs: int) -> tuple[int, ...]:
    """The checks that need no prompt tensors (``PcpPrefillPlan.plan``); returns ``context_lens``."""
    if not isinstance(ctx, PcpContext):
        raise TypeError(f"{op}: context must be a cpattn.PcpContext or None; got {type(ctx).__name__}")
    V.tensor(op, "context.k_cache", ctx.k_cache, dim=4)
    if ctx.v_cache is not None:
        V.tensor(op, "context.v_cache", ctx.v_cache, dim=4)
        if tuple(ctx.v_cache.shape[:3]) != tuple(ctx.k_cache.shape[:3]):
            raise ValueError(f"{op}: context.v_cache must have k_cache's [num_blocks, block_size, Hkv] "
                             f"{tuple(ctx.k_cache.shape[:3])}; got {tuple(ctx.v_cache.shape)}")
    for name in ("k_cache", "v_cache"):
        t = getattr(ctx, name)
        if t is not None and t.device.type == "meta":
            raise ValueError(f"{op}: context.{name} is on the 'meta' device; pass the real cache")
    _check_tables(op, ctx, num_seqs)
    for name, t in (("block_table", ctx.block_table), ("context_lens", ctx.context_lens)):
        if t.device.type == "meta":
            raise ValueError(f"{op}: context.{name} is on the 'meta' device: the plan needs its values")
    lens = tuple(int(x) for x in ctx.context_lens.tolist())
    if any(x < 0 for x in lens):
        raise ValueError(f"{op}: context.context_lens must be >= 0; got {list(lens)[:16]}")
    V.positive_int(op, "context.interleave", ctx.interleave)
    bs = ctx.k_cache.shape[1]
    if bs == 0 or bs % ctx.interleave:
        raise ValueError(f"{op}: context.interleave ({ctx.interleave}) must divide the cache block_size ({bs})")
    return lens


@dataclass
class ContextPlan:
    """Host work of the cached-context part, done once per batch: which prompt tokens have a
    context (``rows``: their rows in the all-gathered ``[N * tmax]`` query buffer), the DCP
    metadata of those queries (each its own one-token request over its request's context), and
    where the results land in this rank's rows (``dst`` <- ``srcc``)."""

    meta: object  # cpattn.dcp_meta.Meta
    prepared: object  # cpattn.dcp_meta.Prepared, published by commit()
    rows: torch.Tensor
    dst: torch.Tensor
    srcc: torch.Tensor
    count: int  # context queries (all ranks)

    def commit(self) -> None:
        from . import dcp_meta

        dcp_meta.commit(self.meta, self.prepared)


def plan_context(op: str, ctx: PcpContext, lens: tuple[int, ...], cu: tuple[int, ...], sched, device) -> ContextPlan:
    """Validate the context's DCP metadata and stage it (nothing reaches the device before
    :meth:`ContextPlan.commit`)."""
    from . import dcp_meta
    from .ring import _global_order

    n, r, tmax = sched.world, sched.rank, sched.tmax
    B = len(cu) - 1
    seq_lens = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.int64)
    seq_of = torch.repeat_interleave(torch.arange(B), seq_lens, output_size=cu[-1])
    lens_t = torch.tensor(lens, dtype=torch.int64)
    ctx_of = lens_t[seq_of]
    ids = torch.nonzero(ctx_of > 0).flatten()  # global tokens that see some context
    src, _ = _global_order(cu, n, tmax)
    meta = dcp_meta.allocate(n, r, ctx.interleave, ctx.k_cache.shape[1], max(B, 1), max(ids.numel(), 1),
                             max(ctx.block_table.shape[1], 1), device)
    prep = dcp_meta.prepare(meta, op, lens_t, ctx.block_table, seq_of[ids], ctx_of[ids], ctx.k_cache.shape[0])
    where = torch.full((cu[-1],), -1, dtype=torch.int64)
    where[ids] = torch.arange(ids.numel())
    mine = where[sched.me.index]
    dst = torch.nonzero(mine >= 0).flatten()
    return ContextPlan(meta, prep, src[ids].to(device), dst.to(device), mine[dst].to(device), ids.numel())


def context_attention(cp: ContextPlan, q, k_cache, v_cache, *, group, scale: float, dv: int, backend,
                      tmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial over the cached context: ``out [Tr, Hq, Dv]`` (q dtype) and
    ``lse [Tr, Hq]`` float32, ``(0, -inf)`` for rows of requests with no context. Device work
    only: one all-gather of the queries, then DCP decode over the context in chunks of
    :data:`CHUNK_TOKENS` queries (the same chunks on every rank)."""
    from . import dcp_combine, dcp_meta
    from .backends import select

    n = comm.world_size(group)
    H = q.shape[1]
    if cp.count == 0:  # contexts only for requests without prompt tokens (agreed: every rank skips)
        return q.new_zeros(q.shape[0], H, dv), torch.full((q.shape[0], H), float("-inf"), device=q.device)
    buf = q.new_zeros(tmax, *q.shape[1:])
    buf[: q.shape[0]] = q
    qc = comm.all_gather(buf, group).reshape(n * tmax, *q.shape[1:]).index_select(0, cp.rows)  # [count]
    m = cp.meta
    be = select("paged_attention", backend, dict(
        q=qc[:1], k_cache=k_cache, v_cache=v_cache, block_table=m.table[:1], query_start_loc=m.arange[:2],
        visible_lens=m.vis[:1], scale=scale, v_head_dim=dv, max_query_len=1, max_kv_len=1))
    merge_be = None
    if n > 1:
        o = q.new_empty(1, H, dv)
        lz = torch.empty(1, H, dtype=torch.float32, device=q.device)
        merge_be = select("merge", backend, {"outs": [o] * n, "lses": [lz] * n, "out": o, "out_lse": lz})
    outs, lses = [], []
    for c0 in range(0, cp.count, CHUNK_TOKENS):
        c1 = min(cp.count, c0 + CHUNK_TOKENS)
        o, l = dcp_meta.attend(m, be, qc[c0:c1], k_cache, v_cache, scale=scale, v_head_dim=dv, start=c0, stop=c1)
        strategy = dcp_combine.default_strategy("replicated", n, c1 - c0, H, dv, q.dtype)
        o, l = dcp_combine.combine(o, l, strategy=strategy, heads="replicated", group=group, backend=merge_be)
        outs.append(o)
        lses.append(l)
    out = q.new_zeros(q.shape[0], H, dv)
    lse = torch.full((q.shape[0], H), float("-inf"), dtype=torch.float32, device=q.device)
    if outs:
        out.index_copy_(0, cp.dst, torch.cat(outs).index_select(0, cp.srcc))
        lse.index_copy_(0, cp.dst, torch.cat(lses).index_select(0, cp.srcc))
    return out, lse


def fields(ctx) -> dict:
    """Agreed across ranks (same keys with or without a context)."""
    try:
        lens = None if ctx is None else tuple(int(x) for x in ctx.context_lens.tolist())
        il = None if ctx is None else int(ctx.interleave)
    except Exception:
        lens, il = "?", "?"
    return {"context.context_lens": lens, "context.interleave": il}
