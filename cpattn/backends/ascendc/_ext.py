"""Finding and loading the compiled torch_npu extension of the AscendC backend.

``setup.py`` (with a CANN toolkit) installs two shared libraries into ``cpattn/_ascendc/``:
``libcpattn_ascendc_kernels.so`` (the kernels, built by CANN's ``ascendc_library``) and
``libcpattn_ascendc.so`` (the binding: host tiling, launches on torch_npu's current stream, and
the ``PrivateUse1`` registrations of the ``cpattn::ascendc_*`` ops). Loading the binding needs
torch_npu already imported (it links against libtorch_npu); this module never imports it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["library_path", "unavailable"]

_DIR = Path(__file__).resolve().parents[2] / "_ascendc"
_NAME = "libcpattn_ascendc.so"
_state: dict[str, str | None] = {}


def library_path() -> Path:
    """Where the built binding is (or would be); ``CPATTN_ASCENDC_LIB`` overrides it."""
    return Path(os.environ.get("CPATTN_ASCENDC_LIB") or _DIR / _NAME)


def unavailable() -> str | None:
    """Why the extension cannot be used here (None: it is loaded). Loads it on first success."""
    if "why" in _state:
        return _state["why"]
    path = library_path()
    if not path.is_file():
        why = (f"extension not built ({path} missing): cpattn was installed without a CANN toolkit "
               "(set ASCEND_HOME_PATH and reinstall; docs/ascendc.md)")
    elif "torch_npu" not in sys.modules:
        return "torch_npu is not imported (import torch_npu first)"  # not cached: it may be imported later
    else:
        try:
            import torch

            torch.ops.load_library(str(path))
            why = None
        except Exception as exc:  # a broken build or a torch/torch_npu/CANN mismatch
            why = f"extension failed to load: {type(exc).__name__}: {exc}"
    _state["why"] = why
    return why
