"""cpattn: context-parallel attention kernels (PCP ring prefill, DCP decode, exact LSE merges).

The AscendC backend's NPU extension (csrc/ascendc/) is built only where a CANN toolkit is found
(``ASCEND_HOME_PATH``) and torch/torch_npu are importable in the build environment (install
with ``pip install --no-build-isolation``); otherwise cpattn installs without it and says so in
one line. ``CPATTN_BUILD_ASCENDC=0`` never builds it; ``=1`` fails when it cannot.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_EXT = "cpattn._ascendc.libcpattn_ascendc"  # -> cpattn/_ascendc/libcpattn_ascendc.so (+ the kernel library beside it)


def _ascendc_wanted() -> bool:
    mode = os.environ.get("CPATTN_BUILD_ASCENDC", "auto")
    cann = os.environ.get("ASCEND_HOME_PATH", "")
    if mode == "0":
        print("cpattn: CPATTN_BUILD_ASCENDC=0: installing without the AscendC NPU extension", file=sys.stderr)
        return False
    if cann and Path(cann).is_dir():
        return True
    if mode == "1":
        sys.exit("cpattn: CPATTN_BUILD_ASCENDC=1 but no CANN toolkit: set ASCEND_HOME_PATH (source CANN's set_env.sh)")
    print("cpattn: no CANN toolkit (ASCEND_HOME_PATH unset): installing without the AscendC NPU extension "
          "(backend 'ascendc' unavailable; see docs/ascendc.md)", file=sys.stderr)
    return False


def _torch_paths() -> tuple[str, str]:
    """(torch's cmake prefix, torch_npu's package dir), asked in a subprocess with torch's
    device-backend autoload off, so that no NPU runtime is touched at build time."""
    code = ("import importlib.util, json, torch.utils; spec = importlib.util.find_spec('torch_npu'); "
            "print(json.dumps([torch.utils.cmake_prefix_path, spec.submodule_search_locations[0] if spec else '']))")
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit("cpattn: a CANN toolkit was found but torch is not importable in the build environment; install "
                 "torch and torch_npu first and use `pip install --no-build-isolation` (or CPATTN_BUILD_ASCENDC=0)\n"
                 + exc.stderr)
    prefix, npu = json.loads(out.strip().splitlines()[-1])
    if not npu:
        sys.exit("cpattn: a CANN toolkit was found but torch_npu is not installed; install it first "
                 "(or CPATTN_BUILD_ASCENDC=0)")
    return prefix, npu


class CMakeAscendC(build_ext):
    """Builds csrc/ascendc with CMake (CANN's ascendc_library for the kernels) into cpattn/_ascendc/."""

    def get_ext_filename(self, ext_name):
        # a plain shared library (no Python module suffix): asked for by full or by last name
        if ext_name == _EXT:
            return os.path.join("cpattn", "_ascendc", "libcpattn_ascendc.so")
        if ext_name == _EXT.rsplit(".", 1)[1]:
            return "libcpattn_ascendc.so"
        return super().get_ext_filename(ext_name)

    def build_extension(self, ext):
        if ext.name != _EXT:
            return super().build_extension(ext)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "ascendc"
        build_dir.mkdir(parents=True, exist_ok=True)
        prefix, npu = _torch_paths()
        subprocess.run(["cmake", "-S", str(ROOT / "csrc" / "ascendc"), "-B", str(build_dir),
                        f"-DCMAKE_PREFIX_PATH={prefix}", f"-DTORCH_NPU_PATH={npu}",
                        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                        f"-DSOC_VERSION={os.environ.get('CPATTN_SOC_VERSION', 'Ascend910B1')}"], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)], check=True)


ext_modules = [Extension(_EXT, sources=[])] if _ascendc_wanted() else []

setup(
    name="cpattn",
    version="0.1.0",
    description="Context-parallel attention kernels: PCP ring prefill, DCP decode, exact LSE merges",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cpattn", "cpattn.*"]),
    python_requires=">=3.10",
    # torch is pinned loosely on purpose: install the build you want (CPU, CUDA, NPU) first;
    # .ci/run installs the CPU build before this package so pip never pulls a CUDA build.
    # ninja: torch.utils.cpp_extension builds the AscendC emulation extension (backend
    # "ascendc_emu") with it on first use; the machine's C++ compiler is the only other need.
    install_requires=["torch>=2.4", "numpy", "ninja"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.100", "pytest-timeout>=2"],
        "triton": ["triton>=3.2"],
        # cpattn.integrations.transformers (ContextParallelLM); the core never imports it
        "transformers": ["transformers>=5"],
        # Huawei's Triton for Ascend: replaces the `triton` module (never with the `triton`
        # extra in one environment); needs pybind11 (undeclared) and, for its interpreter,
        # numpy < 2.4. `make test-ascend-triton` builds its own venv with it.
        "ascend": ["triton-ascend==3.2.0", "pybind11", "numpy<2.4"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeAscendC},
    entry_points={"console_scripts": ["cpattn-bench=cpattn.bench.cli:main"]},
)
