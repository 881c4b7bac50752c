"""Varlen attention with explicit positions as one Triton kernel: the local compute under PCP.

Same contract as the ``attention`` kernel of the PyTorch backend (see
:mod:`cpattn.backends.registry`): ``q [Tq, Hq, Dqk]`` over ``k [Tk, Hkv, Dqk]``,
``v [Tk, Hkv, Dv]`` per sequence (``cu_seqlens_q/k``); with ``causal`` a query sees the keys of
its sequence whose position is ``<=`` its own. Returns ``(out [Tq, Hq, Dv] in q's dtype,
lse [Tq, Hq] float32)``, ``(0, -inf)`` for a query that sees no key.

A work item is (query tile of ``BLOCK_M`` tokens of one sequence, query head, chunk of
``BLOCK_DV`` value channels; block sizes from :func:`.tiles.varlen_blocks`, capped to an Ascend
core's unified buffer); key tiles are walked with an online softmax in float32, and under the causal mask a key tile whose smallest
position is past the query tile's largest is skipped, so blocks the mask hides cost nothing
(positions need not be sorted: the test is on the tile's min and max). ``Dqk != Dv`` and GQA
(query head ``h`` reads KV head ``h // (Hq / Hkv)``; KV is never repeated in memory) are native.

Every load is masked by a rectangle (the tile's valid rows/keys, a prefix, and the head dim), so
nothing past a sequence or a tensor is read.

NaN/inf: a NaN query, or a NaN/inf in a visible K entry that makes a score NaN or ``+inf``,
gives that query's head a NaN output row and a NaN LSE (plain float64 attention gives a NaN row
too); a NaN/inf in a visible V entry reaches the output channels it touches. Caveat: a key
tile is shared by ``BLOCK_M`` queries, so a NaN in the V row of a key that one query sees and
another query of the same tile does not (causal) also reaches the second query (probability 0
times NaN is NaN), as it does in plain attention written as one masked matrix product. A query
that sees no key stays exactly ``(0, -inf)``.

Portable subset (CUDA and triton-ascend): plain pointers and masks, a 1-D grid of at most 65535
programs looping over work items (the AI-core count on an NPU), float32 math after each load
(``tl.dot`` in IEEE float32), positions as int32, 64-bit arithmetic only on scalars, no
autotuning at import. The host builds the tile table from
``cu_seqlens_q`` (one host read, which the PCP layer has already made anyway).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..positions import default_positions
from . import tiles
from .softmax import finish, online_step

MAX_PROGRAMS = tiles.MAX_PROGRAMS
_BIG = tl.constexpr(2**30)


@triton.jit
def _varlen_kernel(
    q_ptr, sq_t, sq_h,
    k_ptr, sk_t, sk_h,
    v_ptr, sv_t, sv_h,
    cuq_ptr, cuk_ptr, qpos_ptr, kpos_ptr, tiles_ptr,
    out_ptr, so_t, so_h,
    lse_ptr, sl_t,
    n_items, HQ, G, NDV, DQK, DV, scale,
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
        dc = item % NDV
        rest = item // NDV
        tile = rest // HQ
        hq = rest % HQ
        hk = hq // G
        b = tl.load(tiles_ptr + 2 * tile)
        m0 = tl.load(tiles_ptr + 2 * tile + 1)
        row0 = tl.load(cuq_ptr + b) + m0  # first query row of the tile
        n_rows = tl.load(cuq_ptr + b + 1) - row0  # valid rows: m_offs < n_rows (a rectangle)
        k_start = tl.load(cuk_ptr + b)
        k_end = tl.load(cuk_ptr + b + 1)
        dv0 = dc * BLOCK_DV
        n_dv = DV - dv0
        rmask = m_offs < n_rows
        qp = tl.load(qpos_ptr + row0 + m_offs, mask=rmask, other=-_BIG)
        qp_max = tl.max(qp, axis=0)
        row0_64 = tl.cast(row0, tl.int64)  # 64-bit arithmetic on scalars only
        q_base = q_ptr + row0_64 * sq_t + tl.cast(hq, tl.int64) * sq_h
        k_head = k_ptr + tl.cast(hk, tl.int64) * sk_h
        v_head = v_ptr + tl.cast(hk, tl.int64) * sv_h + dv0
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        sees = tl.zeros([BLOCK_M], tl.int32)  # rows that see at least one key
        for n0 in range(k_start, k_end, BLOCK_N):
            n_cols = k_end - n0  # valid keys of the tile: n_offs < n_cols
            cmask = n_offs < n_cols
            kp = tl.load(kpos_ptr + n0 + n_offs, mask=cmask, other=_BIG)
            if tl.min(kp, axis=0) <= qp_max:  # else the causal mask hides the whole tile
                n0_64 = tl.cast(n0, tl.int64)
                k_tile = k_head + n0_64 * sk_t
                s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for d0 in range(0, DQK, BLOCK_D):
                    d = d0 + d_offs
                    qd = tl.load(q_base + m_offs[:, None] * sq_t + d[None, :],
                                 mask=(m_offs[:, None] < n_rows) & (d[None, :] < DQK), other=0.0)
                    kd = tl.load(k_tile + n_offs[:, None] * sk_t + d[None, :],
                                 mask=(n_offs[:, None] < n_cols) & (d[None, :] < DQK), other=0.0)
                    s += tl.dot(qd.to(tl.float32), tl.trans(kd.to(tl.float32)), input_precision="ieee")
                keep = rmask[:, None] & cmask[None, :]
                if CAUSAL:
                    keep = keep & (kp[None, :] <= qp[:, None])
                s = tl.where(keep, s * scale, float("-inf"))
                sees = tl.maximum(sees, tl.max(keep.to(tl.int32), axis=1))
                vt = tl.load(v_head + n0_64 * sv_t + n_offs[:, None] * sv_t + dv_offs[None, :],
                             mask=(n_offs[:, None] < n_cols) & (dv_offs[None, :] < n_dv), other=0.0)
                m_i, l_i, acc = online_step(m_i, l_i, acc, s, vt.to(tl.float32))
        o, lse = finish(m_i, l_i, acc, sees > 0)
        o_base = out_ptr + row0_64 * so_t + tl.cast(hq, tl.int64) * so_h + dv0
        tl.store(o_base + m_offs[:, None] * so_t + dv_offs[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=(m_offs[:, None] < n_rows) & (dv_offs[None, :] < n_dv))
        if dc == 0:
            tl.store(lse_ptr + row0_64 * sl_t + hq + m_offs * sl_t, lse, mask=rmask)


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
    blocks = tiles.varlen_blocks(dqk, dv, q.element_size(), dev.type)
    block_m = blocks["BLOCK_M"]
    n_dv = triton.cdiv(dv, blocks["BLOCK_DV"])
    qtiles = [(b, m0) for b in range(len(cu_q) - 1) for m0 in range(0, cu_q[b + 1] - cu_q[b], block_m)]
    tiles_t = torch.tensor(qtiles or [(0, 0)], dtype=torch.int32, device=dev).view(-1)
    if causal:
        qpos, kpos = _positions(cu_q, cu_k, q_positions, k_positions, dev)
    else:  # equal positions: no tile is ever skipped
        qpos = torch.zeros(tq, dtype=torch.int32, device=dev)
        kpos = torch.zeros(k.shape[0], dtype=torch.int32, device=dev)
    n_items = len(qtiles) * hq * n_dv
    _varlen_kernel[tiles.grid(n_items, dev, uses_dot=True)](
        q, q.stride(0), q.stride(1),
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        torch.tensor(cu_q, dtype=torch.int32, device=dev), torch.tensor(cu_k, dtype=torch.int32, device=dev),
        qpos, kpos, tiles_t,
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        n_items, hq, hq // hkv, n_dv, dqk, dv, scale,
        CAUSAL=bool(causal),
        **blocks,
    )
    return out, lse
