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

.PHONY: bench test thorough setup clean

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

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache *.egg-info
