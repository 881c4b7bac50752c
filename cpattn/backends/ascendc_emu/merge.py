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
    if any(not strict.widens(o.dtype, out.dtype) for o in outs):
        reasons.append(f"partials must be {out.dtype} like out, or 16-bit into a float32 out (the kernel reads one "
                       "dtype; rounding a partial down before merging would lose precision)")
    if reasons:
        return reasons
    d = out.shape[-1] if out.dim() else 0
    why = _build.load().merge_attn_states_check(out_lse.numel(), len(outs), d, _DTYPES[out.dtype], _cores())
    return [why] if why else []


def merge(outs, lses, out, out_lse, nan_propagate=False) -> None:
    """The registry's ``merge`` contract: writes ``out`` and ``out_lse`` (``out`` may be an input).
    16-bit partials merged into a float32 ``out`` (PCP's ring accumulator) are widened first
    (exact); ``nan_propagate``: the strict rule of DCP/PCP (:mod:`cpattn.backends.strict`),
    applied around the kernel."""
    bad = strict.poisoned_rows(list(lses)) if nan_propagate else None
    _build.load().merge_attn_states(strict.widen_partials(list(outs), out.dtype), list(lses), out, out_lse, _cores())
    if bad is not None:
        strict.poison(out, out_lse, bad)
