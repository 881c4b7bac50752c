"""Microbenchmarks: ``cpattn-bench`` / ``python -m cpattn.bench``. See :mod:`cpattn.bench.cli`."""
