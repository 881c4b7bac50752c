"""Paged decode attention as one Triton kernel: the per-rank half of DCP decode.

Same contract as the ``paged_attention`` kernel of the PyTorch backend (see
:mod:`cpattn.backends.registry`): query token ``t`` of request ``b`` sees the first
``visible_lens[t]`` keys of ``b``'s local sequence, stored in the paged cache through
``block_table[b]``; the result is ``(out [T, Hq, Dv] in q's dtype, lse [T, Hq] float32)``, with
``(0, -inf)`` for a query that sees no key.

One work item is (query token, KV head): its ``G = Hq / Hkv`` query heads are computed together
against each key tile, so GQA never repeats KV and MLA (``Hkv = 1``, V = the first
``v_head_dim`` channels of the latent K row, no second copy) is the same code. Keys are walked
in tiles of ``BLOCK_N`` positions with an online softmax in float32; positions past
``visible_lens[t]`` are masked loads, so stale or NaN cache contents are never read.

Portable subset (CUDA and triton-ascend): plain pointers and masks, a 1-D grid of at most 65535
programs looping over work items, float32 math after each load (``tl.dot`` in IEEE float32, no
TF32), 64-bit offsets built once per key tile, no autotuning at import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softmax import finish, online_step

MAX_PROGRAMS = 65535


@triton.jit
def _paged_decode_kernel(
    q_ptr, sq_t, sq_h,
    k_ptr, sk_b, sk_s, sk_h,
    v_ptr, sv_b, sv_s, sv_h,
    bt_ptr, sbt_b,
    req_ptr, vis_ptr,
    out_ptr, so_t, so_h,
    lse_ptr, sl_t,
    n_items, HKV, G, DQK, DV, BS, scale,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g_offs = tl.arange(0, BLOCK_G)
    n_offs = tl.arange(0, BLOCK_N)
    d_offs = tl.arange(0, BLOCK_D)
    dv_offs = tl.arange(0, BLOCK_DV)
    g_live = g_offs < G
    for item in range(pid, n_items, nprog):
        t = item // HKV
        h = item % HKV
        t64 = tl.cast(t, tl.int64)
        b = tl.load(req_ptr + t)
        n_vis = tl.load(vis_ptr + t)
        heads = h * G + g_offs  # this item's query heads
        q_rows = q_ptr + t64 * sq_t + heads.to(tl.int64) * sq_h  # [BLOCK_G] row pointers
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for n0 in range(0, n_vis, BLOCK_N):
            pos = n0 + n_offs
            live = pos < n_vis
            blk = tl.load(bt_ptr + tl.cast(b, tl.int64) * sbt_b + pos // BS, mask=live, other=0).to(tl.int64)
            slot = (pos % BS).to(tl.int64)
            k_rows = k_ptr + blk * sk_b + slot * sk_s + h * sk_h  # [BLOCK_N]
            s = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
            for d0 in range(0, DQK, BLOCK_D):
                d = d0 + d_offs
                qd = tl.load(q_rows[:, None] + d[None, :], mask=g_live[:, None] & (d[None, :] < DQK), other=0.0)
                kd = tl.load(k_rows[:, None] + d[None, :], mask=live[:, None] & (d[None, :] < DQK), other=0.0)
                s += tl.dot(qd.to(tl.float32), tl.trans(kd.to(tl.float32)), input_precision="ieee")
            s = tl.where(live[None, :], s * scale, float("-inf"))
            v_rows = v_ptr + blk * sv_b + slot * sv_s + h * sv_h
            vt = tl.load(v_rows[:, None] + dv_offs[None, :], mask=live[:, None] & (dv_offs[None, :] < DV), other=0.0)
            m_i, l_i, acc = online_step(m_i, l_i, acc, s, vt.to(tl.float32))
        o, lse = finish(m_i, l_i, acc)
        o_rows = out_ptr + t64 * so_t + heads.to(tl.int64) * so_h
        tl.store(o_rows[:, None] + dv_offs[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=g_live[:, None] & (dv_offs[None, :] < DV))
        tl.store(lse_ptr + t64 * sl_t + heads, lse, mask=g_live)


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
                    max_query_len, max_kv_len):
    T, Hq, Dqk = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    Dv = int(v_head_dim)
    G = Hq // Hkv
    dev = q.device
    out = torch.empty(T, Hq, Dv, dtype=q.dtype, device=dev)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=dev)
    if T == 0:
        return out, lse
    B = block_table.shape[0]
    qsl = query_start_loc.to(torch.int64)
    req = torch.repeat_interleave(torch.arange(B, device=dev, dtype=torch.int32), qsl[1:] - qsl[:-1], output_size=T)
    vis = visible_lens.to(torch.int32).contiguous()
    table = block_table.to(torch.int32).contiguous()
    v = k_cache if v_cache is None else v_cache  # MLA: V is the first Dv channels of the K row
    n_items = T * Hkv
    block_g = max(16, triton.next_power_of_2(G))
    _paged_decode_kernel[(min(n_items, MAX_PROGRAMS),)](
        q, q.stride(0), q.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        table, table.stride(0),
        req, vis,
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        n_items, Hkv, G, Dqk, Dv, bs, float(scale),
        BLOCK_G=block_g, BLOCK_N=16, BLOCK_D=min(64, max(16, triton.next_power_of_2(Dqk))),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
    )
    return out, lse
