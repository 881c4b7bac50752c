"""The AscendC backend: the kernels of ``csrc/ascendc/kernels/`` on Ascend NPUs, through torch_npu.

Each kernel is a backend-level op, ``torch.ops.cpattn.ascendc_merge_attn_states``,
``ascendc_paged_decode`` and ``ascendc_varlen_prefill`` (schemas in :mod:`cpattn._library`), whose
NPU (``PrivateUse1``) implementation is registered by the compiled extension
(``csrc/ascendc/npu/``), which ``setup.py`` builds only when a CANN toolkit is found
(``ASCEND_HOME_PATH``). This module never imports torch_npu: on NPU tensors torch_npu is already
loaded; on any other device the backend only says why it cannot run.

The backend can run an input when the tensors are on an NPU, the extension was built and loads,
and the kernel's own limits hold: dtypes and layouts checked here, then the compiled binding's
``*_check`` op (the same validation and host tiling as a launch: unified-buffer budget, head
dims, 32-bit sizes); otherwise its reasons say which. It comes first in automatic choice for NPU
tensors, so an input it cannot run falls through to the next backend.

What was verified where: the kernel sources run on CPU through the AscendC emulation
(backend ``ascendc_emu``); the binding and host tiling code compile (``-fsyntax-only``) against
torch_npu's shipped headers (``make check-ascendc-host``). Nothing here has been compiled by
CANN's compiler or run on an NPU: no CANN toolkit or NPU was available (docs/ascendc.md).
"""
from __future__ import annotations

import math

import torch

from ..positions import default_positions
from .. import strict
from ..registry import Backend
from . import _ext

BACKEND = Backend(
    "ascendc",
    "AscendC kernels on Ascend NPUs (torch_npu; built only where a CANN toolkit is found)",
    device_types=("npu",),
)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _common(tensors: dict, dtype) -> list[str]:
    reasons = []
    why = _ext.unavailable()
    if why:
        reasons.append(why)
    if dtype not in _DTYPES:
        reasons.append(f"dtype {dtype} not supported (float32/float16/bfloat16; no float64 on the vector unit)")
    for name, t in tensors.items():
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            reasons.append(f"{name} needs unit stride on its last dim")
    return reasons


def _kernel_says(on: torch.Tensor, check_op, *args) -> list[str]:
    """The compiled kernel's own reason (its validation and host tiling: UB budget, head dims,
    32-bit sizes), asked only when ``on`` is an NPU tensor and the extension is loaded."""
    if on.device.type != "npu" or _ext.unavailable():
        return []
    why = check_op(*args)
    return [why] if why else []


def _check_merge(outs, lses, out, out_lse) -> list[str]:
    reasons = _common({}, out.dtype)
    if any(l.dtype != torch.float32 for l in lses) or out_lse.dtype != torch.float32:
        reasons.append("LSEs must be float32 (the kernel's LSE contract)")
    if any(o.dtype not in strict.ONE_DTYPE for o in outs):
        reasons.append("partials must be float32, float16 or bfloat16 (mixed dtypes are merged in float32)")
    if out.shape[-1] == 0:
        reasons.append("head dim 0")
    if not (out.is_contiguous() and out_lse.is_contiguous()):
        reasons.append("out and out_lse must be contiguous (written in place)")
    if reasons:
        return reasons
    d = out.shape[-1]
    rows = [out.view(-1, d)] * len(outs)  # what the kernel will read: out's dtype and size (see merge)
    return _kernel_says(out, torch.ops.cpattn.ascendc_merge_attn_states_check, rows,
                        [l.reshape(-1) for l in lses], out.view(-1, d), out_lse.view(-1))




def merge(outs, lses, out, out_lse, nan_propagate=False) -> None:
    """The kernel reads one dtype: partials of mixed dtypes (the PCP ring's float32 accumulator
    with 16-bit partials) are merged in float32 (:func:`cpattn.backends.strict.merge_one_dtype`);
    ``nan_propagate``: the strict rule of DCP/PCP, applied around the kernel."""
    d = out.shape[-1]

    def kernel(rows, rl, o, ol):
        torch.ops.cpattn.ascendc_merge_attn_states([r.reshape(-1, d) for r in rows], [l.reshape(-1) for l in rl],
                                                   o.view(-1, d), ol.view(-1))

    strict.merge_one_dtype(kernel, outs, lses, out, out_lse, nan_propagate)


def _check_paged(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
                 max_query_len, max_kv_len) -> list[str]:
    reasons = _common({"q": q, "k_cache": k_cache, "v_cache": v_cache}, q.dtype)
    if k_cache.dtype != q.dtype or (v_cache is not None and v_cache.dtype != q.dtype):
        reasons.append("q, k_cache and v_cache must share one dtype")
    return reasons or _kernel_says(q, torch.ops.cpattn.ascendc_paged_decode_check, q, k_cache, v_cache, block_table,
                                   query_start_loc, visible_lens, float(scale), int(v_head_dim), int(max_query_len),
                                   int(max_kv_len))


def paged_attention(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
                    max_query_len, max_kv_len):
    return torch.ops.cpattn.ascendc_paged_decode(
        q, k_cache, v_cache, block_table, query_start_loc, visible_lens, float(scale), int(v_head_dim),
        int(max_query_len), int(max_kv_len))


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False,
                  scale=None) -> list[str]:
    reasons = _common({"q": q, "k": k, "v": v}, q.dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append("q, k and v must share one dtype")
    if reasons:
        return reasons
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if causal and (q_positions is None or k_positions is None):  # shapes are all the check reads
        q_positions = torch.empty(q.shape[0], dtype=torch.int32, device=q.device)
        k_positions = torch.empty(k.shape[0], dtype=torch.int32, device=q.device)
    return _kernel_says(q, torch.ops.cpattn.ascendc_varlen_prefill_check, q, k, v, cu_seqlens_q, cu_seqlens_k,
                        q_positions, k_positions, bool(causal), scale)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if causal and (q_positions is None or k_positions is None):
        dq, dk = default_positions([int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()],
                                   q.device)
        q_positions = dq if q_positions is None else q_positions
        k_positions = dk if k_positions is None else k_positions
    return torch.ops.cpattn.ascendc_varlen_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions,
                                                  bool(causal), scale)


BACKEND.kernel("merge", check=_check_merge)(merge)
BACKEND.kernel("paged_attention", check=_check_paged)(paged_attention)
BACKEND.kernel("attention", check=_check_varlen)(attention)
