"""The tolerance rule of the test suite: see :mod:`cpattn.testing.tolerance` (one copy, shared
with bench/device_check.py)."""
from cpattn.testing.tolerance import (  # noqa: F401
    assert_attention_close, assert_close, compare, max_err, plain_attention, score_floor, ulp_floor)
