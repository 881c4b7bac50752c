"""The ``paged_attention`` kernel of the ``ascendc_emu`` backend: DCP's local kernel
(csrc/ascendc/kernels/paged_decode.cpp) run through the emulation.

Contract: the registry's ``paged_attention`` (see :mod:`cpattn.backends.registry`). The kernel
computes in float32 for every input dtype and returns a float32 LSE (also for float32 queries,
where the PyTorch kernel returns float64): what the NPU kernel does. Block-table entries, query
start offsets and visible lengths are passed as int32. A block-table entry outside the cache that a
query would read turns that query's rows into NaN (the kernel checks before it copies).
"""
from __future__ import annotations

import torch

from . import _build

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _cores() -> int:
    from . import CORES

    return CORES


def check(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
          max_query_len, max_kv_len) -> list[str]:
    reasons = []
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {q.dtype} not supported (float32/float16/bfloat16; no float64 on Ascend)")
    if k_cache.dtype != q.dtype or (v_cache is not None and v_cache.dtype != q.dtype):
        reasons.append("q, k_cache and v_cache must have one dtype")
    if reasons:
        return reasons
    T, hq, dqk = q.shape
    nb, bs, hkv, _ = k_cache.shape
    why = _build.load().paged_decode_check(_DTYPES[q.dtype], T, block_table.shape[0], hq, hkv, dqk, int(v_head_dim),
                                           nb, bs, block_table.shape[1], v_cache is None, _cores())
    return [why] if why else []


def paged_attention(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
                    max_query_len, max_kv_len):
    """``(out [T, Hq, Dv] in q's dtype, lse [T, Hq] float32)``; ``(0, -inf)`` for a query with no
    visible key."""
    out, lse, _ = _build.load().paged_decode(q, k_cache, v_cache, block_table, query_start_loc, visible_lens,
                                             float(scale), int(v_head_dim), _cores())
    return out, lse
