"""The fast PyTorch backend: plain torch ops, any device, float32 accumulation.

One module per kernel; this file only assembles them into the backend object.
"""
from __future__ import annotations

from ..registry import Backend
from . import merge as _merge
from . import varlen as _varlen
from . import paged as _paged

BACKEND = Backend("pytorch", "chunked plain-PyTorch kernels, float32 accumulation (any device)")
BACKEND.kernel("merge")(_merge.merge)
BACKEND.kernel("paged_attention", _paged.check, reserve=_paged.reserve)(_paged.paged_attention)
BACKEND.kernel("attention", _varlen.check)(_varlen.attention)
