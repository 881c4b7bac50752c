"""cpattn: context-parallel attention kernels (PCP ring prefill, DCP decode, exact LSE merges)."""
from setuptools import find_packages, setup

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
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.100", "pytest-timeout>=2"],
        "triton": ["triton>=3.2"],
        # Huawei's Triton for Ascend: replaces the `triton` module (never with the `triton`
        # extra in one environment); needs pybind11 (undeclared) and, for its interpreter,
        # numpy < 2.4. `make test-ascend-triton` builds its own venv with it.
        "ascend": ["triton-ascend==3.2.0", "pybind11", "numpy<2.4"],
    },
    entry_points={"console_scripts": ["cpattn-bench=cpattn.bench.cli:main"]},
)
