"""Paged decode attention as one Triton kernel: the per-rank half of DCP decode.

Same contract as the ``paged_attention`` kernel of the PyTorch backend (see
:mod:`cpattn.backends.registry`): query token ``t`` of request ``b`` sees the first
``visible_lens[t]`` keys of ``b``'s local sequence, stored in the paged cache through
``block_table[b]``; the result is ``(out [T, Hq, Dv] in q's dtype, lse [T, Hq] float32)``, with
``(0, -inf)`` for a query that sees no key.

A work item is (query token, KV head, chunk of ``BLOCK_G`` of its ``G = Hq / Hkv`` query heads,
chunk of ``BLOCK_DV`` value channels): the heads of a chunk are computed together against each
key tile, so GQA never repeats KV and MLA (``Hkv = 1``, V = the first ``v_head_dim`` channels of
the latent K row, no second copy) is the same code. Block sizes come from
:func:`.tiles.paged_blocks`, capped so one iteration's tiles fit an Ascend core's unified buffer;
heads or channels past a block become more work items, never a bigger tile.

The cache is walked page by page: one block-table entry (a scalar load) per page, and K/V read
as strided 2-D tiles ``[keys of the page, channels]`` whose masks are rectangles bounded by the
page's valid length and the head dim, so no per-key gather exists, nothing past the page's
valid rows, the table's used entries or the head dim is read, and stale or NaN cache contents
past ``visible_lens[t]`` are never loaded. Scores use an online softmax in float32.

NaN/inf: a NaN query, or a NaN/inf in a visible K entry that makes a score NaN or ``+inf``,
gives that query's head a NaN output row and a NaN LSE (plain float64 attention gives a NaN
row too); a NaN/inf in a visible V entry reaches the output channels it touches, as in plain
attention. A query that sees no key stays exactly ``(0, -inf)``.

Portable subset (CUDA and triton-ascend): plain pointers and masks, a 1-D grid of at most 65535
programs looping over work items (the AI-core count on an NPU), float32 math after each load
(``tl.dot`` in IEEE float32, no TF32), 64-bit arithmetic only on scalars (the page's base
address), no autotuning at import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .softmax import finish, online_step

MAX_PROGRAMS = tiles.MAX_PROGRAMS


@triton.jit
def _paged_decode_kernel(
    q_ptr, sq_t, sq_h,
    k_ptr, sk_b, sk_s, sk_h,
    v_ptr, sv_b, sv_s, sv_h,
    bt_ptr, sbt_b,
    req_ptr, vis_ptr,
    out_ptr, so_t, so_h,
    lse_ptr, sl_t,
    n_items, HKV, G, NG, NDV, DQK, DV, BS, scale,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g_offs = tl.arange(0, BLOCK_G)
    n_offs = tl.arange(0, BLOCK_N)
    d_offs = tl.arange(0, BLOCK_D)
    dv_offs = tl.arange(0, BLOCK_DV)
    for item in range(pid, n_items, nprog):
        dc = item % NDV
        rest = item // NDV
        gc = rest % NG
        rest = rest // NG
        h = rest % HKV
        t = rest // HKV
        b = tl.load(req_ptr + t)
        n_vis = tl.load(vis_ptr + t)
        g0 = gc * BLOCK_G
        n_g = G - g0  # live heads in this chunk (rows g_offs < n_g)
        dv0 = dc * BLOCK_DV
        n_dv = DV - dv0  # live V channels in this chunk
        head0 = tl.cast(h * G + g0, tl.int64)
        q_base = q_ptr + tl.cast(t, tl.int64) * sq_t + head0 * sq_h
        k_head = k_ptr + tl.cast(h, tl.int64) * sk_h
        v_head = v_ptr + tl.cast(h, tl.int64) * sv_h + dv0
        table = bt_ptr + tl.cast(b, tl.int64) * sbt_b
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for page in range(0, tl.cdiv(n_vis, BS)):
            blk = tl.load(table + page).to(tl.int64)  # one block id per page
            page_len = tl.minimum(BS, n_vis - page * BS)
            k_page = k_head + blk * sk_b
            v_page = v_head + blk * sv_b
            for s0 in range(0, page_len, BLOCK_N):
                rows = s0 + n_offs
                live = rows < page_len
                s = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
                for d0 in range(0, DQK, BLOCK_D):
                    d = d0 + d_offs
                    qd = tl.load(q_base + g_offs[:, None] * sq_h + d[None, :],
                                 mask=(g_offs[:, None] < n_g) & (d[None, :] < DQK), other=0.0)
                    kd = tl.load(k_page + rows[:, None] * sk_s + d[None, :],
                                 mask=(rows[:, None] < page_len) & (d[None, :] < DQK), other=0.0)
                    s += tl.dot(qd.to(tl.float32), tl.trans(kd.to(tl.float32)), input_precision="ieee")
                s = tl.where(live[None, :], s * scale, float("-inf"))
                vt = tl.load(v_page + rows[:, None] * sv_s + dv_offs[None, :],
                             mask=(rows[:, None] < page_len) & (dv_offs[None, :] < n_dv), other=0.0)
                m_i, l_i, acc = online_step(m_i, l_i, acc, s, vt.to(tl.float32))
        o, lse = finish(m_i, l_i, acc, tl.zeros([BLOCK_G], tl.int32) + n_vis > 0)
        o_base = out_ptr + tl.cast(t, tl.int64) * so_t + head0 * so_h + dv0
        tl.store(o_base + g_offs[:, None] * so_h + dv_offs[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=(g_offs[:, None] < n_g) & (dv_offs[None, :] < n_dv))
        if dc == 0:
            tl.store(lse_ptr + tl.cast(t, tl.int64) * sl_t + head0 + g_offs, lse, mask=g_offs < n_g)


def check(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
          max_query_len, max_kv_len) -> list[str]:
    reasons = []
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype} not supported (float32/float16/bfloat16)")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            reasons.append(f"{name} needs unit stride on its last dim")
    return reasons


def paged_attention(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
                    max_query_len, max_kv_len, out=None):
    """The registry's ``paged_attention``; ``out``: an optional ``[T, Hq, Dv]`` q-dtype buffer
    (unit stride on its last dim) that every element of the output is written into."""
    T, Hq, Dqk = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    Dv = int(v_head_dim)
    G = Hq // Hkv
    dev = q.device
    if out is None:
        out = torch.empty(T, Hq, Dv, dtype=q.dtype, device=dev)
    elif Dv > 1 and out.stride(-1) != 1:
        raise ValueError(f"paged_attention: out needs unit stride on its last dim; got strides {out.stride()}")
    lse = torch.empty(T, Hq, dtype=torch.float32, device=dev)
    if T == 0:
        return out, lse
    B = block_table.shape[0]
    qsl = query_start_loc.to(torch.int64)
    req = torch.repeat_interleave(torch.arange(B, device=dev, dtype=torch.int32), qsl[1:] - qsl[:-1], output_size=T)
    vis = visible_lens.to(torch.int32).contiguous()
    table = block_table.to(torch.int32).contiguous()
    v = k_cache if v_cache is None else v_cache  # MLA: V is the first Dv channels of the K row
    blocks = tiles.paged_blocks(G, Dqk, Dv, bs, q.element_size())
    n_g = triton.cdiv(G, blocks["BLOCK_G"])
    n_dv = triton.cdiv(Dv, blocks["BLOCK_DV"])
    n_items = T * Hkv * n_g * n_dv
    _paged_decode_kernel[tiles.grid(n_items, dev, uses_dot=True)](
        q, q.stride(0), q.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        table, table.stride(0),
        req, vis,
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        n_items, Hkv, G, n_g, n_dv, Dqk, Dv, bs, float(scale),
        **blocks,
    )
    return out, lse
