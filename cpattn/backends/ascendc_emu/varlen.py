"""The ``attention`` kernel of the ``ascendc_emu`` backend: PCP's local kernel
(csrc/ascendc/kernels/varlen_prefill.cpp) run through the emulation.

Contract: the registry's ``attention`` (see :mod:`cpattn.backends.registry`). Positions are passed
to the kernel as int32 (default positions, the reference's convention, are made here when a
causal call gives none); K and V may be strided views (e.g. of one packed K|V buffer) as long as
their channels have unit stride, else they are copied. Rows past the last sequence of
``cu_seqlens_q`` are ``(0, -inf)``.
"""
from __future__ import annotations

import math

import torch

from ..positions import default_positions
from . import _build

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_I32 = (-(2**31), 2**31 - 1)


def _cores() -> int:
    from . import CORES

    return CORES


def check(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False, scale=None):
    reasons = []
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {q.dtype} not supported (float32/float16/bfloat16; no float64 on Ascend)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append("q, k and v must have one dtype")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        reasons.append("Hq must be a multiple of Hkv")
    if causal:
        for name, p in (("q_positions", q_positions), ("k_positions", k_positions)):
            if p is not None and p.numel() and (int(p.min()) < _I32[0] or int(p.max()) > _I32[1]):
                reasons.append(f"{name} outside the int32 range of the kernel")
    if reasons:
        return reasons
    cu = [int(x) for x in cu_seqlens_q.tolist()]
    max_q = max([b - a for a, b in zip(cu, cu[1:])] or [0])
    why = _build.load().varlen_prefill_check(_DTYPES[q.dtype], q.shape[0], k.shape[0], len(cu) - 1, q.shape[1],
                                             k.shape[1], q.shape[2], v.shape[2], max_q, bool(causal), _cores())
    return [why] if why else []


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False, scale=None):
    """``(out [Tq, Hq, Dv] in q's dtype, lse [Tq, Hq] float32)``; ``(0, -inf)`` for a query that
    sees no key."""
    tq, hq, dqk = q.shape
    dv = v.shape[-1]
    scale = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    out = torch.empty(tq, hq, dv, dtype=q.dtype)
    lse = torch.empty(tq, hq, dtype=torch.float32)
    for a, b in ((0, min(cu_q[0], tq)), (min(cu_q[-1], tq), tq)):  # rows of no sequence
        out[a:b] = 0
        lse[a:b] = float("-inf")
    if causal and (q_positions is None or k_positions is None):
        dq, dk = default_positions(cu_q, cu_k, q.device)
        q_positions = dq if q_positions is None else q_positions
        k_positions = dk if k_positions is None else k_positions
    max_q = max([b - a for a, b in zip(cu_q, cu_q[1:])] or [0])
    _build.load().varlen_prefill(q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                                 q_positions if causal else None, k_positions if causal else None, bool(causal), scale,
                                 max_q, out, lse, _cores())
    return out, lse
