"""What a block of code allocates, and where its collectives write: two recorders for the
"run allocates nothing sized by data, the combine uses the plan's buffers" tests.

``fresh_allocations()``: a TorchDispatchMode that records, for every ATen op run inside the
block, each output tensor whose storage is none of the op's inputs' (a new allocation: factory
ops, out-of-place results; ``out=`` and in-place ops write into an input and are not counted),
as ``(op name, bytes)``. Code run inside another op's implementation is seen only if called
directly (a ``torch.library`` custom op shows as one op), so tests audit a plan's ``_execute``.

``collective_outputs()``: wraps :mod:`cpattn.comm`'s collectives to record, per call, the
collective's name and the output buffer it wrote (None: it allocated its own).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cpattn import comm


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Fresh(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() and _storage(t) not in ins:
                self.records.append((str(func), t.untyped_storage().nbytes()))
        return out


@contextlib.contextmanager
def fresh_allocations():
    mode = _Fresh()
    with mode:
        yield mode.records


_COLLECTIVES = ("all_gather", "all_to_all", "reduce_scatter_sum", "all_reduce_sum")


@contextlib.contextmanager
def collective_outputs():
    """``with collective_outputs() as recs:`` -> ``[(name, output buffer or None)]``; the
    in-place ``all_reduce_sum`` records its input (what it writes)."""
    recs: list[tuple[str, torch.Tensor | None]] = []
    saved = {name: getattr(comm, name) for name in _COLLECTIVES}

    def wrap(name, fn):
        def f(t, group=None, **kw):
            recs.append((name, t if name == "all_reduce_sum" else kw.get("out")))
            return fn(t, group, **kw)
        return f

    for name, fn in saved.items():
        setattr(comm, name, wrap(name, fn))
    try:
        yield recs
    finally:
        for name, fn in saved.items():
            setattr(comm, name, fn)


def inside(t: torch.Tensor, buffers) -> bool:
    """Whether ``t``'s first element lies in one of ``buffers`` (tensors or untyped storages),
    and for a tensor, its elements all do."""
    lo = t.data_ptr()
    hi = lo + max(t.numel(), 1) * t.element_size()
    for b in buffers:
        b0 = b.data_ptr()
        b1 = b0 + (b.nbytes() if isinstance(b, torch.UntypedStorage) else b.numel() * b.element_size())
        if b0 <= lo < b1 and hi <= b1:
            return True
    return False
