"""The ``ascendc_emu`` backend: cpattn's AscendC kernels run on CPU tensors through a strict CPU
emulation of the AscendC API (csrc/ascendc/emu/).

It runs the very kernel sources meant for Ascend NPUs (csrc/ascendc/kernels/), compiled by the
machine's C++ compiler against the emulation's own ``kernel_operator.h``; the emulation refuses
what the NPU would get silently wrong (misaligned DataCopy, UB overflow, queue misuse, missing
pipe synchronisation, blocks racing on global memory; see docs/ascendc.md). It is a test
vehicle, never chosen automatically: request it with ``backend="ascendc_emu"``.

What it proves and what not: numbers equal to the float64 reference within the project's
tolerance and no broken API rule the emulation checks. It does not prove that bisheng compiles
the kernels, nor anything about speed or the NPU's own rounding of Exp/Ln.

The extension is compiled on first use (cached; see :mod:`._build`); when it cannot be built the
backend lists that as its reason.
"""
from __future__ import annotations

import os

import torch

from ..registry import Backend
from . import _build
from . import merge as _merge
from . import paged as _paged
from . import varlen as _varlen

# Vector cores the host tiling spreads rows over (Atlas A2 910B3: 40 AIV cores).
CORES = int(os.environ.get("CPATTN_ASCENDC_EMU_CORES", "40"))

BACKEND = Backend(
    "ascendc_emu",
    "AscendC kernels on CPU tensors through a strict emulation of the AscendC API (a test vehicle)",
    device_types=("cpu",),
    auto_device_types=(),
)


def extension_reasons() -> list[str]:
    """[] when the extension builds (building it on first call), else why not."""
    try:
        _build.load()
    except RuntimeError as exc:
        return [str(exc)]
    return []


def kernel(op: str, check=None):
    """Register ``fn`` as the backend's kernel for ``op``; ``check`` (the kernel's own reasons)
    runs only once the extension is known to build. One call per kernel."""

    def full_check(**inputs) -> list[str]:
        reasons = extension_reasons()
        if not reasons and check is not None:
            reasons = check(**inputs)
        return reasons

    return BACKEND.kernel(op, full_check)


kernel("merge", _merge.check)(_merge.merge)
kernel("paged_attention", _paged.check)(_paged.paged_attention)
kernel("attention", _varlen.check)(_varlen.attention)
