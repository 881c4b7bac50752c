"""Varlen attention with explicit positions as one Triton kernel: the local compute under PCP.

Same contract as the ``attention`` kernel of the PyTorch backend (see
:mod:`cpattn.backends.registry`): ``q [Tq, Hq, Dqk]`` over ``k [Tk, Hkv, Dqk]``,
``v [Tk, Hkv, Dv]`` per sequence (``cu_seqlens_q/k``); with ``causal`` a query sees the keys of
its sequence whose position is ``<=`` its own. Returns ``(out [Tq, Hq, Dv] in q's dtype,
lse [Tq, Hq] float32)``, ``(0, -inf)`` for a query that sees no key.

A work item is (query tile of ``BLOCK_M`` tokens of one sequence, query head); key tiles are
walked with an online softmax in float32, and under the causal mask a key tile whose smallest
position is past the query tile's largest is skipped, so blocks the mask hides cost nothing
(positions need not be sorted: the test is on the tile's min and max). ``Dqk != Dv`` and GQA
(query head ``h`` reads KV head ``h // (Hq / Hkv)``; KV is never repeated in memory) are native.

Portable subset (CUDA and triton-ascend): plain pointers and masks, a 1-D grid of at most 65535
programs looping over work items, float32 math after each load (``tl.dot`` in IEEE float32),
positions as int32, no autotuning at import. The host builds the tile table from
``cu_seqlens_q`` (one host read, which the PCP layer has already made anyway).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..positions import default_positions
from .softmax import finish, online_step

MAX_PROGRAMS = 65535
_BIG = tl.constexpr(2**30)


@triton.jit
def _varlen_kernel(
    q_ptr, sq_t, sq_h,
    k_ptr, sk_t, sk_h,
    v_ptr, sv_t, sv_h,
    cuq_ptr, cuk_ptr, qpos_ptr, kpos_ptr, tiles_ptr,
    out_ptr, so_t, so_h,
    lse_ptr, sl_t,
    n_items, HQ, G, DQK, DV, scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    m_offs = tl.arange(0, BLOCK_M)
    n_offs = tl.arange(0, BLOCK_N)
    d_offs = tl.arange(0, BLOCK_D)
    dv_offs = tl.arange(0, BLOCK_DV)
    for item in range(pid, n_items, nprog):
        tile = item // HQ
        hq = item % HQ
        hk = hq // G
        b = tl.load(tiles_ptr + 2 * tile)
        m0 = tl.load(tiles_ptr + 2 * tile + 1)
        q_end = tl.load(cuq_ptr + b + 1)
        k_start = tl.load(cuk_ptr + b)
        k_end = tl.load(cuk_ptr + b + 1)
        rows = tl.load(cuq_ptr + b) + m0 + m_offs
        rmask = rows < q_end
        rows64 = rows.to(tl.int64)
        qp = tl.load(qpos_ptr + rows, mask=rmask, other=-_BIG)
        qp_max = tl.max(qp, axis=0)
        q_rows = q_ptr + rows64 * sq_t + hq * sq_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for n0 in range(k_start, k_end, BLOCK_N):
            cols = n0 + n_offs
            cmask = cols < k_end
            kp = tl.load(kpos_ptr + cols, mask=cmask, other=_BIG)
            if tl.min(kp, axis=0) <= qp_max:  # else the causal mask hides the whole tile
                cols64 = cols.to(tl.int64)
                k_rows = k_ptr + cols64 * sk_t + hk * sk_h
                s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for d0 in range(0, DQK, BLOCK_D):
                    d = d0 + d_offs
                    qd = tl.load(q_rows[:, None] + d[None, :], mask=rmask[:, None] & (d[None, :] < DQK), other=0.0)
                    kd = tl.load(k_rows[:, None] + d[None, :], mask=cmask[:, None] & (d[None, :] < DQK), other=0.0)
                    s += tl.dot(qd.to(tl.float32), tl.trans(kd.to(tl.float32)), input_precision="ieee")
                keep = rmask[:, None] & cmask[None, :]
                if CAUSAL:
                    keep = keep & (kp[None, :] <= qp[:, None])
                s = tl.where(keep, s * scale, float("-inf"))
                v_rows = v_ptr + cols64 * sv_t + hk * sv_h
                vt = tl.load(v_rows[:, None] + dv_offs[None, :], mask=cmask[:, None] & (dv_offs[None, :] < DV),
                             other=0.0)
                m_i, l_i, acc = online_step(m_i, l_i, acc, s, vt.to(tl.float32))
        o, lse = finish(m_i, l_i, acc)
        o_rows = out_ptr + rows64 * so_t + hq * so_h
        tl.store(o_rows[:, None] + dv_offs[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (dv_offs[None, :] < DV))
        tl.store(lse_ptr + rows64 * sl_t + hq, lse, mask=rmask)


def check(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False, scale=None):
    reasons = []
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype} not supported (float32/float16/bfloat16)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            reasons.append(f"{name} needs unit stride on its last dim")
    return reasons


def _positions(cu_q: list[int], cu_k: list[int], q_positions, k_positions, device):
    """int32 positions; the defaults are the reference's (keys 0..Lk-1, queries bottom-right)."""
    if q_positions is None or k_positions is None:
        dq, dk = default_positions(cu_q, cu_k, device)
        q_positions = dq if q_positions is None else q_positions
        k_positions = dk if k_positions is None else k_positions
    return q_positions.to(device=device, dtype=torch.int32), k_positions.to(device=device, dtype=torch.int32)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False, scale=None):
    tq, hq, dqk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    dev = q.device
    scale = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
    out = torch.empty(tq, hq, dv, dtype=q.dtype, device=dev)
    lse = torch.empty(tq, hq, dtype=torch.float32, device=dev)
    if tq == 0 or hq == 0:
        return out, lse
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    block_m = 64 if dev.type == "cuda" else 16
    tiles = [(b, m0) for b in range(len(cu_q) - 1) for m0 in range(0, cu_q[b + 1] - cu_q[b], block_m)]
    tiles_t = torch.tensor(tiles or [(0, 0)], dtype=torch.int32, device=dev).view(-1)
    if causal:
        qpos, kpos = _positions(cu_q, cu_k, q_positions, k_positions, dev)
    else:  # equal positions: no tile is ever skipped
        qpos = torch.zeros(tq, dtype=torch.int32, device=dev)
        kpos = torch.zeros(k.shape[0], dtype=torch.int32, device=dev)
    n_items = len(tiles) * hq
    _varlen_kernel[(max(1, min(n_items, MAX_PROGRAMS)),)](
        q, q.stride(0), q.stride(1),
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        torch.tensor(cu_q, dtype=torch.int32, device=dev), torch.tensor(cu_k, dtype=torch.int32, device=dev),
        qpos, kpos, tiles_t,
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        n_items, hq, hq // hkv, dqk, dv, scale,
        CAUSAL=bool(causal),
        BLOCK_M=block_m, BLOCK_N=block_m, BLOCK_D=min(64, max(16, triton.next_power_of_2(dqk))),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
    )
    return out, lse
