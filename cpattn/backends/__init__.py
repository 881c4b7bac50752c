"""Backends behind the public ops: the float64 reference, a fast PyTorch path (any device).

See :mod:`cpattn.backends.registry` for how a backend is chosen.
"""
from .registry import AUTO_ORDER, Backend, BackendError, dispatch, get_backend, list_backends, select

__all__ = ["AUTO_ORDER", "Backend", "BackendError", "dispatch", "get_backend", "list_backends", "select"]
