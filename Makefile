# Two commands do all set-up on a fresh machine (see README.md):
#   make bench   # the main job: cpattn-bench's default tour, on CPU with gloo ranks
#   make test    # the test suite (pytest + hypothesis, real gloo ranks)
# Both create .venv and install into it: the CPU build of torch first (so pip never pulls a
# multi-GB CUDA build), then cpattn with its test, triton and transformers extras (Triton kernels
# are checked on CPU under TRITON_INTERPRET=1; transformers runs the end-to-end model tests and
# `cpattn-bench e2e`). Override TORCH for another build.
VENV  ?= .venv
TORCH ?= torch==2.13.0
PY    := $(VENV)/bin/python

# The AscendC backend's host code, compile-checked without CANN (g++ -fsyntax-only) against the C++
# headers shipped in the torch_npu wheel (and its ACL/HCCL headers) and the torch release it pairs
# with, installed (no dependencies) into a separate venv: torch_npu must never be installed into
# .venv, where it would make `import torch` fail without CANN. Only the wheels' headers are read
# (nothing there is imported), so pip skips byte-compiling their Python files (--no-compile: a
# third of the install time). What it covers: docs/ascendc.md.
NPU_VENV  ?= .venv-npu-check
TORCH_NPU ?= torch-npu==2.14.0
NPU_TORCH ?= torch==2.14.1

.PHONY: bench test thorough setup clean check-ascendc-host test-ascend-triton device-check

$(VENV)/.installed: setup.py pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,triton,transformers]"
	touch $@

setup: $(VENV)/.installed

bench: $(VENV)/.installed
	$(VENV)/bin/cpattn-bench

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The thorough hypothesis profile (thousands of examples per property): before resolving an issue.
# One property of the emulated AscendC kernels takes 10-20 minutes at this size on 2 cores, past
# pytest-timeout's 600 s safety net for the CI profile: the net is widened to 2 hours here
# (distributed calls keep their own hang timeouts).
thorough: $(VENV)/.installed
	CPATTN_HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q --timeout 7200

$(NPU_VENV)/.installed: Makefile
	python3 -m venv $(NPU_VENV)
	$(NPU_VENV)/bin/python -m pip install -q --no-deps --no-compile "$(NPU_TORCH)" "$(TORCH_NPU)"
	touch $@

check-ascendc-host: $(NPU_VENV)/.installed
	bash csrc/ascendc/npu/check_host.sh "$$($(NPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"


# The triton-ascend lane: a second venv (triton-ascend replaces the `triton` module, so it never
# shares one with stock Triton) with the CPU torch, the `ascend` extra (triton-ascend 3.2.0,
# pybind11, numpy<2.4) and the test extras; no torch_npu (it needs CANN). It runs the Triton
# tests under triton-ascend's interpreter (few examples: the `ascend` hypothesis profile), then
# lowers every kernel through triton-ascend's compiler front end (make_ir -> ttir -> linalg).
ASCEND_VENV ?= .venv-ascend
APY := $(ASCEND_VENV)/bin/python

$(ASCEND_VENV)/.installed: setup.py pyproject.toml Makefile
	python3 -m venv $(ASCEND_VENV)
	$(APY) -m pip install -q "$(TORCH)"
	$(APY) -m pip install -q -e ".[test,ascend]"
	touch $@

test-ascend-triton: $(ASCEND_VENV)/.installed
	CPATTN_HYPOTHESIS_PROFILE=ascend TRITON_INTERPRET=1 $(APY) -m pytest -q -m "not distributed" \
		tests/test_triton.py tests/test_triton_nonfinite.py tests/test_triton_tiles.py tests/test_device_check.py
	TRITON_INTERPRET=0 $(APY) -m pytest -q tests/test_triton_ascend_lowering.py

# On a machine with one CUDA GPU (after installing a CUDA build of torch and triton into .venv):
# correctness and timings of every Triton kernel, JSON + markdown (see bench/device_check.py).
device-check:
	$(PY) bench/device_check.py

clean:
	rm -rf $(VENV) $(NPU_VENV) $(ASCEND_VENV) .hypothesis .pytest_cache *.egg-info
