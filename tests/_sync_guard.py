"""``forbid_host_syncs()``: make every call that reads device values on the host raise.

Patched for the duration of the block (issue 8's list): ``Tensor.item/tolist/__bool__/__int__/
__float__/__index__``, ``nonzero`` (function and method), boolean-mask ``__getitem__`` and
``__setitem__``, ``repeat_interleave`` with tensor repeats and no ``output_size``,
``masked_select`` and ``unique``. Each raises :class:`HostSync` naming the call, so a test fails
with the place that synced. Works in any process (gloo ranks included).
"""
from __future__ import annotations

import contextlib

import torch


class HostSync(AssertionError):
    pass


def _boom(name):
    def f(*args, **kwargs):
        raise HostSync(f"host sync: {name} called inside run()")
    return f


def _is_mask(idx) -> bool:
    if isinstance(idx, torch.Tensor):
        return idx.dtype == torch.bool
    if isinstance(idx, (tuple, list)):
        return any(_is_mask(i) for i in idx)
    return False


@contextlib.contextmanager
def forbid_host_syncs():
    T = torch.Tensor
    saved = {}
    orig_get, orig_set = T.__getitem__, T.__setitem__
    orig_ri_t, orig_ri_f = T.repeat_interleave, torch.repeat_interleave

    def getitem(self, idx):
        if _is_mask(idx):
            raise HostSync("host sync: boolean-mask indexing (Tensor.__getitem__) inside run()")
        return orig_get(self, idx)

    def setitem(self, idx, value):
        if _is_mask(idx):
            raise HostSync("host sync: boolean-mask assignment (Tensor.__setitem__) inside run()")
        return orig_set(self, idx, value)

    def ri(orig):
        def f(input, repeats=None, dim=None, *, output_size=None):
            if isinstance(repeats, torch.Tensor) and output_size is None or repeats is None and output_size is None:
                raise HostSync("host sync: repeat_interleave with tensor repeats and no output_size inside run()")
            if repeats is None:
                return orig(input, output_size=output_size)
            return orig(input, repeats, dim, output_size=output_size)
        return f

    patches = {
        (T, "item"): _boom("Tensor.item"), (T, "tolist"): _boom("Tensor.tolist"),
        (T, "__bool__"): _boom("Tensor.__bool__"), (T, "__int__"): _boom("Tensor.__int__"),
        (T, "__float__"): _boom("Tensor.__float__"), (T, "__index__"): _boom("Tensor.__index__"),
        (T, "nonzero"): _boom("Tensor.nonzero"), (torch, "nonzero"): _boom("torch.nonzero"),
        (T, "masked_select"): _boom("Tensor.masked_select"), (torch, "masked_select"): _boom("torch.masked_select"),
        (T, "unique"): _boom("Tensor.unique"), (torch, "unique"): _boom("torch.unique"),
        (T, "__getitem__"): getitem, (T, "__setitem__"): setitem,
        (T, "repeat_interleave"): ri(orig_ri_t), (torch, "repeat_interleave"): ri(orig_ri_f),
    }
    for (obj, name), fn in patches.items():
        saved[(obj, name)] = obj.__dict__.get(name, getattr(obj, name))
        setattr(obj, name, fn)
    try:
        yield
    finally:
        for (obj, name), fn in saved.items():
            setattr(obj, name, fn)
