"""Shared test setup: hypothesis profiles and real gloo worlds.

Profiles (``CPATTN_HYPOTHESIS_PROFILE``): ``ci`` (default; sized so the whole suite stays well
under 15 minutes on 2 cores), ``thorough`` (thousands of examples per local property; run it
before resolving an issue) and ``ascend`` (the triton-ascend interpreter lane of
``make test-ascend-triton``: a few examples per property, the same assertions). Tests scale their example counts with :func:`examples`.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter; it must be chosen before any
    # kernel module is imported (the tests request backend="triton" explicitly).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

from cpattn.testing.gloo import GlooWorld

PROFILE = os.environ.get("CPATTN_HYPOTHESIS_PROFILE", "ci")
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.register_profile("ascend", max_examples=6, derandomize=True, **_COMMON)
settings.load_profile(PROFILE)


def examples(ci: int, thorough: int) -> int:
    """Example count for a property under the active profile."""
    if PROFILE == "ascend":
        return min(ci, 6)
    return thorough if PROFILE == "thorough" else ci


_worlds: dict[int, GlooWorld] = {}


@pytest.fixture(scope="session")
def gloo():
    """``gloo(n)`` -> a persistent :class:`GlooWorld` of n ranks (30 s per call before it counts
    as a hang)."""

    def get(n: int) -> GlooWorld:
        if n not in _worlds:
            _worlds[n] = GlooWorld(n, timeout=float(os.environ.get("CPATTN_DIST_TIMEOUT", "30")))
        return _worlds[n]

    yield get
    # close the worlds side by side: each close waits for its ranks to leave the process group
    # and exit (seconds on a loaded machine), and the worlds are independent
    with ThreadPoolExecutor(max(1, len(_worlds))) as pool:
        list(pool.map(GlooWorld.close, _worlds.values()))
    _worlds.clear()
