"""The Triton backend: kernels for CUDA, and for Ascend NPUs through triton-ascend.

Importing it needs the ``triton`` package (``pip install cpattn[triton]``); without it the
registry reports the backend as not importable and never breaks ``import cpattn``.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is imported), and only when requested explicitly (``backend="triton"``):
that is how the test suite checks the kernels without a GPU. Automatic choice uses this backend
for CUDA and NPU tensors only.

What was verified where: the kernels are tested against the float64 reference under the CPU
interpreter in CI. Runs on a real CUDA GPU or an Ascend NPU are recorded in docs/performance.md
when a session had such a device; see there before relying on either.
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError -> "not importable" in the registry)

from ..registry import Backend
from . import merge as _merge
from . import paged as _paged
from . import varlen as _varlen

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKEND = Backend(
    "triton",
    "Triton kernels (CUDA; Ascend via triton-ascend; CPU only under TRITON_INTERPRET=1)",
    device_types=("cuda", "npu") + (("cpu",) if INTERPRETER else ()),
    auto_device_types=("cuda", "npu"),
)


def _check_merge(outs, lses, out, out_lse) -> list[str]:
    reasons = []
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {out.dtype} not supported (float32/float16/bfloat16; no float64 on Ascend)")
    if out.shape[-1] == 0:
        reasons.append("head dim 0")
    return reasons


BACKEND.kernel("merge", check=_check_merge)(_merge.merge)
BACKEND.kernel("paged_attention", check=_paged.check)(_paged.paged_attention)
BACKEND.kernel("attention", check=_varlen.check)(_varlen.attention)
