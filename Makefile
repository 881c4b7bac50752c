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
# .venv, where it would make `import torch` fail without CANN. What it covers: docs/ascendc.md.
NPU_VENV  ?= .venv-npu-check
TORCH_NPU ?= torch-npu==2.14.0
NPU_TORCH ?= torch==2.14.1

.PHONY: bench test thorough setup clean check-ascendc-host

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
thorough: $(VENV)/.installed
	CPATTN_HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q

$(NPU_VENV)/.installed: Makefile
	python3 -m venv $(NPU_VENV)
	$(NPU_VENV)/bin/python -m pip install -q --no-deps "$(NPU_TORCH)" "$(TORCH_NPU)"
	touch $@

check-ascendc-host: $(NPU_VENV)/.installed
	bash csrc/ascendc/npu/check_host.sh "$$($(NPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

clean:
	rm -rf $(VENV) $(NPU_VENV) .hypothesis .pytest_cache *.egg-info
