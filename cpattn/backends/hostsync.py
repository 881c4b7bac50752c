"""Whether kernels may read device values on the host (a flag for the plan/run serving API).

Some kernels take cheap shortcuts on CPU, where reading a tensor value costs no device sync
(``bool(weights.any())`` to skip a masking step, ``int(lens.min())`` to skip masks). Inside
``DcpDecodePlan.run`` / ``PcpPrefillPlan.run`` these are switched off, so the code path that runs
is the one that also runs on a device, where such a read would be a host sync (and would break
CUDA-graph capture). Results are the same either way; only the CPU shortcut is skipped.
"""
from __future__ import annotations

import contextlib
import contextvars

_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("cpattn_host_reads", default=True)


def host_reads_allowed() -> bool:
    """False inside :func:`no_host_reads` (a plan's ``run``)."""
    return _allowed.get()


@contextlib.contextmanager
def no_host_reads():
    token = _allowed.set(False)
    try:
        yield
    finally:
        _allowed.reset(token)
