"""The ``merge`` kernel of the ``ascendc_emu`` backend: csrc/ascendc/kernels/merge_attn_states.cpp
run through the emulation."""
from __future__ import annotations

import torch

from .. import strict
from . import _build

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _cores() -> int:
    from . import CORES

    return CORES


def check(outs, lses, out, out_lse) -> list[str]:
    reasons = []
    if out.dtype not in _DTYPES:
        reasons.append(f"dtype {out.dtype} not supported (float32/float16/bfloat16; no float64 on Ascend)")
    if any(l.dtype != torch.float32 for l in lses):
        reasons.append("LSEs must be float32")
    if out_lse is not None and out_lse.dtype != torch.float32:
        reasons.append("out_lse must be float32")
    if any(o.dtype not in strict.ONE_DTYPE for o in outs):
        reasons.append("partials must be float32, float16 or bfloat16 (mixed dtypes are merged in float32)")
    if reasons:
        return reasons
    d = out.shape[-1] if out.dim() else 0
    why = _build.load().merge_attn_states_check(out_lse.numel(), len(outs), d, _DTYPES[out.dtype], _cores())
    return [why] if why else []


def merge(outs, lses, out, out_lse, nan_propagate=False) -> None:
    """The registry's ``merge`` contract: writes ``out`` and ``out_lse`` (``out`` may be an input).
    The kernel reads one dtype: partials of mixed dtypes (the PCP ring's float32 accumulator with
    16-bit partials) are merged in float32 (:func:`cpattn.backends.strict.merge_one_dtype`);
    ``nan_propagate``: the strict rule of DCP/PCP, applied around the kernel."""
    ext = _build.load()
    strict.merge_one_dtype(lambda o, l, to, tl: ext.merge_attn_states(o, l, to, tl, _cores()),
                           outs, lses, out, out_lse, nan_propagate)
