"""Build (once) and load the AscendC emulation extension with torch.utils.cpp_extension.

The sources are the AscendC kernels (csrc/ascendc/kernels/*.cpp), their host tiling
(csrc/ascendc/host/*.cpp) and the emulation with the kernels' bindings (csrc/ascendc/emu/*.cpp).
The machine's C++ compiler and ninja are all it needs. The build is cached in
``$CPATTN_ASCENDC_EMU_BUILD_DIR`` (default ``~/.cache/cpattn/ascendc_emu/<python>-<torch>``);
torch rebuilds only when a source changes. Sources are found next to the ``cpattn`` package (a
source checkout or an editable install).
"""
from __future__ import annotations

import glob
import os
import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3] / "csrc" / "ascendc"
EMU_DIR = ROOT / "emu"
KERNEL_DIR = ROOT / "kernels"
HOST_DIR = ROOT / "host"
CFLAGS = ["-O2", "-std=c++17", "-fvisibility=hidden"]

_lock = threading.Lock()
_module = None
_error: str | None = None


def build_dir() -> Path:
    d = os.environ.get("CPATTN_ASCENDC_EMU_BUILD_DIR")
    if d:
        return Path(d)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.replace('+', '_')}"
    return cache / "cpattn" / "ascendc_emu" / tag


def sources() -> list[str]:
    found = [sorted(glob.glob(str(d / "*.cpp"))) for d in (EMU_DIR, KERNEL_DIR, HOST_DIR)]
    return [f for group in found for f in group]


def load():
    """The extension module (built on first call); raises RuntimeError saying why it cannot be."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        try:
            if not (EMU_DIR / "kernel_operator.h").is_file():
                raise FileNotFoundError(f"AscendC sources not found under {ROOT} (use a source checkout or `pip install -e`)")
            from torch.utils import cpp_extension

            out = build_dir()
            out.mkdir(parents=True, exist_ok=True)
            _module = cpp_extension.load(
                name="cpattn_ascendc_emu",
                sources=sources(),
                extra_include_paths=[str(EMU_DIR), str(KERNEL_DIR), str(HOST_DIR)],
                extra_cflags=CFLAGS,
                build_directory=str(out),
                verbose=os.environ.get("CPATTN_ASCENDC_EMU_VERBOSE") == "1",
            )
        except Exception as exc:  # no compiler, no ninja, a compile error: say so, once
            _error = f"the AscendC emulation extension does not build here: {type(exc).__name__}: {exc}"
            _error = _error[:2000]
            raise RuntimeError(_error) from exc
        return _module
