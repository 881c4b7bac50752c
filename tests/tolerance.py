"""The tolerance rule of the test suite: see :mod:`cpattn.testing.tolerance` (one copy, shared
with bench/device_check.py)."""
from cpattn.testing.tolerance import assert_close, compare, max_err, plain_attention, ulp_floor  # noqa: F401
