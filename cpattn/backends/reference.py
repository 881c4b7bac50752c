"""The reference backend: :mod:`cpattn.reference` (float64 math) behind the kernel interface.

Results are rounded to the output dtype (float32 for LSEs). Slow, exact, runs on any device.
"""
from __future__ import annotations

from .. import reference
from .registry import Backend

BACKEND = Backend("reference", "float64 oracle in plain PyTorch (slow; any device)")


@BACKEND.kernel("merge")
def merge(outs, lses, out, out_lse):
    o, l = reference.merge_n(outs, lses)
    out.copy_(o)
    out_lse.copy_(l)
