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

The DCP op wants the same queries on every rank (``heads="replicated"``), and its query rule is
"a query at global position P sees keys <= P" with the queries being the *last* tokens of each
request's cached sequence. So the prompt queries are all-gathered once, and each query with some
context is passed as its own one-token "request" whose sequence is its request's context
(``seq_lens = C_b``, position ``C_b - 1``: it sees all ``C_b`` cached tokens); its block-table row
is its request's. Calls go in chunks of :data:`CHUNK_TOKENS` queries (the same number on every
rank, since ``cu_seqlens`` and ``context_lens`` are agreed) to bound the repeated block table.
The DCP op merges the ranks' partials; every rank keeps its own rows.
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


def validate(op: str, ctx: PcpContext, q, k, v, num_seqs: int) -> tuple[int, ...]:
    """Local checks of the context against the prompt; returns ``context_lens`` as ints."""
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
    V.tensor(op, "context.block_table", ctx.block_table, dim=2, dtypes=V.INDEX_DTYPES)
    V.tensor(op, "context.context_lens", ctx.context_lens, dim=1, dtypes=V.INDEX_DTYPES)
    for name, t in (("block_table", ctx.block_table), ("context_lens", ctx.context_lens)):
        if t.shape[0] != num_seqs:
            raise ValueError(f"{op}: context.{name} must have one row per sequence of cu_seqlens ({num_seqs}); "
                             f"got {t.shape[0]}")
    lens = tuple(int(x) for x in ctx.context_lens.tolist())
    if any(x < 0 for x in lens):
        raise ValueError(f"{op}: context.context_lens must be >= 0; got {list(lens)[:16]}")
    V.positive_int(op, "context.interleave", ctx.interleave)
    return lens


def fields(ctx) -> dict:
    """Agreed across ranks (same keys with or without a context)."""
    try:
        lens = None if ctx is None else tuple(int(x) for x in ctx.context_lens.tolist())
        il = None if ctx is None else int(ctx.interleave)
    except Exception:
        lens, il = "?", "?"
    return {"context.context_lens": lens, "context.interleave": il}


def context_attention(q, ctx: PcpContext, lens: tuple[int, ...], cu: tuple[int, ...], parts, *, group,
                      scale: float, dv: int, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial over the cached context: ``out [Tr, Hq, Dv]`` (q dtype) and
    ``lse [Tr, Hq]`` float32, ``(0, -inf)`` for rows of requests with no context."""
    from .dcp import dcp_decode_attention
    from .ring import _global_order

    n, r = len(parts), comm.rank(group)
    me = parts[r]
    tmax = max(p.num_tokens for p in parts)
    buf = q.new_zeros(tmax, *q.shape[1:])
    buf[: q.shape[0]] = q
    src, _ = _global_order(cu, n, tmax)
    q_all = comm.all_gather(buf, group).reshape(n * tmax, *q.shape[1:])[src.to(q.device)]  # global order
    seq_lens = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.int64)
    seq_of = torch.repeat_interleave(torch.arange(len(lens)), seq_lens)
    ctx_of = torch.tensor(lens, dtype=torch.int64)[seq_of]
    ids = torch.nonzero(ctx_of > 0).flatten()
    total = cu[-1]
    out_g = q.new_zeros(total, q.shape[1], dv)
    lse_g = torch.full((total, q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    table = ctx.block_table
    for c0 in range(0, ids.numel(), CHUNK_TOKENS):
        sel = ids[c0:c0 + CHUNK_TOKENS]
        o, l = dcp_decode_attention(
            q_all[sel.to(q.device)].contiguous(), ctx.k_cache, ctx.v_cache,
            table[seq_of[sel].to(table.device)].contiguous(), ctx_of[sel].to(device=q_all.device, dtype=ctx.context_lens.dtype),
            group=group, interleave=ctx.interleave, scale=scale, v_head_dim=dv if ctx.v_cache is None else None,
            return_lse=True, backend=backend,
        )
        out_g[sel.to(q.device)] = o
        lse_g[sel.to(q.device)] = l
    rows = me.index.to(q.device)
    return out_g[rows], lse_g[rows]
