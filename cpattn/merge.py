"""Public merge ops: the exact combination of partial attention results.

LSE convention (see :mod:`cpattn.lse`): ``lse`` is float32, natural log, shaped like ``out``
without its last dim. ``(0, -inf)`` is the empty state; ``+inf`` or NaN in an input LSE also
means empty, and the ``out`` rows under it are ignored (even if they hold NaN). (Inside DCP and
PCP, cpattn merges its own kernels' partials strictly instead: there a NaN LSE marks a row that
saw a NaN/inf and stays NaN; see ``nan_propagate`` in :mod:`cpattn.backends.registry`.)

Forward only: no backward. Inputs that require grad are refused (ValueError) while grad mode is
on; under ``torch.no_grad()``/``torch.inference_mode()`` they are fine.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _validate as V
from .backends import dispatch

__all__ = ["merge_attn_states", "merge_attn_states_n"]


def merge_attn_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets into the result over their union.

    Args:
        out_a, out_b: ``[..., D]`` partial outputs, same shape, dtype (float32, float16,
            bfloat16 or float64) and device.
        lse_a, lse_b: ``[...]`` float32 natural-log LSEs (``out`` shape without ``D``).
        out: optional ``[..., D]`` buffer in the inputs' dtype; may be ``out_a`` or ``out_b``
            itself (in-place merge).
        out_lse: optional ``[...]`` float32 buffer; may be ``lse_a`` or ``lse_b``.
        backend: ``"pytorch"``, ``"reference"``, ... or None (``CPATTN_BACKEND``, else automatic).

    Returns:
        ``(out [..., D], lse [...])``: ``out`` in the inputs' dtype, ``lse`` float32, computed in
        float32: ``lse = log(exp(lse_a) + exp(lse_b))``,
        ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``. Two empty inputs give
        ``(0, -inf)``.

    Raises:
        TypeError / ValueError naming the argument for bad shapes, dtypes or devices, for output
        buffers that overlap an input (other than being that input), each other, or themselves
        (a stride-0 ``out_lse``), and for inputs that require grad (forward only); nothing is
        written then. :class:`cpattn.BackendError` if the requested backend cannot run it.

    ``meta`` tensors give ``meta`` results of the right shapes and dtypes (shape-only runs).
    """
    return _call("merge_attn_states", [out_a, out_b], [lse_a, lse_b], out, out_lse, backend)


def merge_attn_states_n(
    outs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial attention results over disjoint key sets (N >= 1).

    Args:
        outs: ``[N, ..., D]`` stacked partial outputs (or a sequence of N ``[..., D]`` tensors).
        lses: ``[N, ...]`` float32 natural-log LSEs (or a sequence of N ``[...]`` tensors).
        out, out_lse, backend: as in :func:`merge_attn_states`; ``out`` may be ``outs[i]``.

    Returns:
        ``(out [..., D], lse [...])`` in the inputs' dtype and float32: the merge of all N,
        exactly (up to float32 rounding) attention over the union of the key sets. The result
        does not depend on the order of the inputs beyond float32 rounding.
    """
    op = "merge_attn_states_n"
    return _call(op, _as_list(op, "outs", outs), _as_list(op, "lses", lses), out, out_lse, backend)


def _call(op: str, outs: list, lses: list, out, out_lse, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager calls run the kernel directly (the custom-op layer costs ~100 us a call, which
    adds up in decode loops); under ``torch.compile`` the registered ops keep the kernel opaque."""
    two = op == "merge_attn_states"
    if torch.compiler.is_compiling():
        validate(op, outs, lses, out, out_lse)
        if out is None and out_lse is None:
            if two:
                return torch.ops.cpattn.merge_attn_states(outs[0], lses[0], outs[1], lses[1], backend)
            return torch.ops.cpattn.merge_attn_states_n(outs, lses, backend)
        out, out_lse = _out_buffers(op, outs, lses, out, out_lse)
        if two:
            torch.ops.cpattn.merge_attn_states_out(outs[0], lses[0], outs[1], lses[1], out, out_lse, backend)
        else:
            torch.ops.cpattn.merge_attn_states_n_out(outs, lses, out, out_lse, backend)
        return out, out_lse
    out, out_lse = _out_buffers(op, outs, lses, out, out_lse)  # validates first
    _run_checked(op, outs, lses, out, out_lse, backend)
    return out, out_lse


# ---- shared by the torch.library registrations (cpattn/_library.py) ----

def _as_list(op: str, name: str, x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() < 1:
            raise ValueError(f"{op}: {name} must be [N, ...]; got a 0-dim tensor")
        return list(x.unbind(0))
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{op}: {name} must be a tensor [N, ...] or a sequence of tensors; got {type(x).__name__}")


def validate(op: str, outs: list, lses: list, out=None, out_lse=None) -> None:
    """Check merge inputs (and optional output buffers); raise before anything is written."""
    if len(outs) == 0:
        raise ValueError(f"{op}: outs is empty; at least one partial result (N >= 1) is needed")
    if len(lses) != len(outs):
        raise ValueError(f"{op}: outs and lses must have the same length N; got {len(outs)} and {len(lses)}")
    two = len(outs) == 2 and op == "merge_attn_states"
    o_names = ["out_a", "out_b"] if two else [f"outs[{i}]" for i in range(len(outs))]
    l_names = ["lse_a", "lse_b"] if two else [f"lses[{i}]" for i in range(len(lses))]
    for n, o in zip(o_names, outs):
        V.tensor(op, n, o, min_dim=1, dtypes=V.FLOAT_DTYPES)
    V.same(op, "shape", dict(zip(o_names, outs)), "shape")
    V.same(op, "dtype", dict(zip(o_names, outs)), "dtype")
    for n, l in zip(l_names, lses):
        V.lse_tensor(op, n, l, outs[0].shape[:-1])
    V.same_device(op, dict(zip(o_names + l_names, list(outs) + list(lses))))
    V.forward_only(op, dict(zip(o_names + l_names, list(outs) + list(lses))))
    if out is not None:
        V.out_tensor(op, "out", out, shape=outs[0].shape, dtype=outs[0].dtype, device=outs[0].device)
    if out_lse is not None:
        V.out_tensor(op, "out_lse", out_lse, shape=outs[0].shape[:-1], dtype=torch.float32, device=outs[0].device)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` that a (non-negatively strided) tensor can touch."""
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _has_memory(t: torch.Tensor) -> bool:
    """Meta tensors (shape-only runs) have no storage: nothing can overlap there."""
    return t.numel() > 0 and t.device.type != "meta"


def _self_overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (a stride-0 dim from ``expand()``, or
    strides that interleave). Conservative: a layout whose freedom from overlap is not evident
    from sorted strides counts as overlapping (output buffers are plain in practice)."""
    extent = 0  # elements spanned by the dims already seen, minus one
    for n, st in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n > 1), key=lambda d: d[1]):
        if st <= extent:
            return True
        extent += (n - 1) * st
    return False


def check_outputs(op: str, out: torch.Tensor, out_lse: torch.Tensor) -> None:
    """Output buffers must not overlap themselves or each other: the kernel would write one
    element twice (a corrupt result) or fail half-way, after part of the result was written."""
    for name, t in (("out", out), ("out_lse", out_lse)):
        if _has_memory(t) and _self_overlaps(t):
            raise ValueError(f"{op}: {name} has elements that share memory (e.g. a stride-0 dim from expand()); "
                             f"pass a buffer whose elements are distinct")
    if _has_memory(out) and _has_memory(out_lse) and out.device == out_lse.device:
        lo, hi = _span(out)
        llo, lhi = _span(out_lse)
        if llo < hi and lo < lhi:
            raise ValueError(f"{op}: out_lse shares memory with out (their byte ranges overlap); pass separate buffers")


def check_aliasing(op: str, inputs: list[torch.Tensor], buf: torch.Tensor, name: str) -> None:
    """``buf`` may be exactly one of the inputs (in-place) or share no memory with any of them."""
    if not _has_memory(buf):
        return
    lo, hi = _span(buf)
    for x in inputs:
        if not _has_memory(x) or x.device != buf.device:
            continue
        xlo, xhi = _span(x)
        if xlo < hi and lo < xhi:
            exact = x.data_ptr() == buf.data_ptr() and x.stride() == buf.stride() and x.shape == buf.shape
            if not exact:
                raise ValueError(
                    f"{op}: {name} partially overlaps an input; pass an input itself (in-place) or a separate buffer"
                )


def _out_buffers(op, outs, lses, out, out_lse):
    """Allocate the missing one of (out, out_lse) for the mutating variant."""
    validate(op, outs, lses, out, out_lse)
    if out is None:
        out = torch.empty_like(outs[0], memory_format=torch.contiguous_format)
    if out_lse is None:
        out_lse = torch.empty(outs[0].shape[:-1], dtype=torch.float32, device=outs[0].device)
    return out, out_lse


def run(op: str, outs: list, lses: list, out, out_lse, backend) -> None:
    """Validate, then merge into ``out``/``out_lse`` on the chosen backend."""
    validate(op, outs, lses, out, out_lse)
    _run_checked(op, outs, lses, out, out_lse, backend)


def _run_checked(op: str, outs: list, lses: list, out, out_lse, backend) -> None:
    check_outputs(op, out, out_lse)
    check_aliasing(op, list(outs) + list(lses), out, "out")
    check_aliasing(op, list(outs) + list(lses), out_lse, "out_lse")
    dispatch("merge", backend, outs=list(outs), lses=list(lses), out=out, out_lse=out_lse)
