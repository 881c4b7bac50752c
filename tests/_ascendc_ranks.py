"""Rank-side helper for the ascendc_emu distributed tests (module-level: GlooWorld pickles it by
reference)."""
from __future__ import annotations


def load_emu() -> bool:
    """Load (building if needed) the AscendC emulation extension on this rank, so that the first
    timed call does not pay for it: a fresh rank process checks the build with ninja and imports
    the module, which on a loaded machine can take longer than a collective's timeout."""
    from cpattn.backends.ascendc_emu import _build

    _build.load()
    return True
