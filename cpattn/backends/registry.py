"""Backend registry and dispatch.

A backend is a named set of kernels. Each kernel comes with a ``check`` that lists the reasons
it cannot run a given input (empty list: it can). Dispatch:

* ``backend="name"`` (or the ``CPATTN_BACKEND`` environment variable when ``backend`` is None)
  is an explicit request: if that backend cannot run the input, :class:`BackendError` is raised
  with its reasons. It never falls back silently.
* Otherwise the first backend in :data:`AUTO_ORDER` with no reason is used; if none can run the
  input, :class:`BackendError` lists every backend's reasons.

Backends are imported lazily, so an optional one (Triton, AscendC) whose dependencies are
missing only reports "not importable: ..." (or, for AscendC, "extension not built ...") as its
reason and never breaks ``import cpattn``.

Kernel signatures (internal, after the public layer validated the input):

* ``merge(outs, lses, out, out_lse, nan_propagate=False)``: ``outs`` a list of N tensors
  ``[..., D]``, ``lses`` a list of N float32 tensors ``[...]``; writes the merged result into
  ``out`` (inputs' dtype) and ``out_lse`` (float32). ``out`` may be one of ``outs`` (in-place
  merge). Input LSEs of ``+inf``/NaN are empty (the public contract); with ``nan_propagate``
  (DCP and PCP merging their kernels' partials) they make the merged row NaN instead.
* ``paged_attention(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale,
  v_head_dim, max_query_len, max_kv_len)`` -> ``(out, lse)``: ``q [T, Hq, Dqk]`` against one
  rank's paged cache ``k_cache [NB, bs, Hkv, Dqk]``, ``v_cache [NB, bs, Hkv, Dv]`` (None: MLA,
  V = first ``v_head_dim`` channels of K); ``block_table [B, MB]``, ``query_start_loc [B+1]``;
  query ``t`` sees the first ``visible_lens[t]`` local keys of its request; host ints
  ``max_query_len``/``max_kv_len`` bound the per-request query count and ``visible_lens``.
  Returns ``out [T, Hq, Dv]`` (q dtype) and ``lse [T, Hq]`` (float32; for float32 q a kernel may
  return float64, which DCP keeps through its cross-rank merge; ``(0, -inf)`` when no key).
  Optional keywords a kernel may accept (callers ask :meth:`Backend.accepts`):
  ``min_visible`` (a host int ``<= min(visible_lens)``), ``out`` (a ``[T, Hq, Dv]`` q-dtype
  buffer, unit stride on its last dim, to write the output into) and ``workspace`` (a dict the
  caller keeps between calls, where the kernel keeps its scratch buffers; the kernel's
  ``reserve`` fills it at a caller's maximum sizes once, :class:`Kernel`).
  NaN/inf inputs (both attention kernels): a row that sees a key and whose query row, or the
  key or value of a key it sees, holds a NaN or inf is *poisoned*: ``out`` and ``lse`` NaN
  (:mod:`cpattn.reference`'s rule). Keys a row does not see never affect it.
* ``attention(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, causal, scale)`` ->
  ``(out, lse)``: varlen attention of ``q [Tq, Hq, Dqk]`` over ``k [Tk, Hkv, Dqk]``,
  ``v [Tk, Hkv, Dv]`` (last dim stride 1); ``cu_seqlens_q/k [B+1]`` int tensors; with ``causal``
  a query sees the keys of its sequence at positions ``<=`` its own (``q_positions [Tq]``,
  ``k_positions [Tk]`` int64, or None: keys ``0..Lk-1``, queries bottom-right aligned); ``scale``
  a float or None (``1/sqrt(Dqk)``). Returns ``out [Tq, Hq, Dv]`` (q dtype) and ``lse [Tq, Hq]``
  (float32, natural log; ``(0, -inf)`` for a query that sees no key).
"""
from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["Backend", "BackendError", "AUTO_ORDER", "get_backend", "list_backends", "select", "dispatch"]

ENV_VAR = "CPATTN_BACKEND"

# Module that defines each backend (as a module-level ``BACKEND``), in automatic-choice order:
# fastest first, the float64 oracle last.
_MODULES = {
    "ascendc": "cpattn.backends.ascendc",
    "triton": "cpattn.backends.triton",
    "pytorch": "cpattn.backends.pytorch",
    "reference": "cpattn.backends.reference",
    # never chosen automatically (auto_device_types=()): a test vehicle for the AscendC kernels
    "ascendc_emu": "cpattn.backends.ascendc_emu",
}
AUTO_ORDER = tuple(_MODULES)


class BackendError(RuntimeError):
    """No backend (or not the requested one) can run this input; the message lists why."""


@dataclass
class Kernel:
    """``fn``: the kernel; ``check``: why it cannot run an input; ``reserve``: for kernels taking
    a ``workspace``, ``reserve(workspace, **max_sizes)`` allocates its scratch at the largest
    sizes a caller will pass (so that later calls allocate none of it)."""

    fn: Callable[..., Any]
    check: Callable[..., list[str]] | None = None
    reserve: Callable[..., None] | None = None


@dataclass
class Backend:
    """A named set of kernels, each able to say why it cannot run an input.

    ``device_types``: the torch device types the backend runs on (None: any).
    ``auto_device_types``: those on which automatic choice may pick it (None: all it runs on).
    """

    name: str
    description: str
    device_types: tuple[str, ...] | None = None
    auto_device_types: tuple[str, ...] | None = None
    kernels: dict[str, Kernel] = field(default_factory=dict)

    def kernel(self, op: str, check: Callable[..., list[str]] | None = None,
               reserve: Callable[..., None] | None = None):
        """Decorator: register ``fn`` as this backend's kernel for ``op``."""

        def deco(fn):
            self.kernels[op] = Kernel(fn, check, reserve)
            return fn

        return deco

    def reasons(self, op: str, inputs: dict[str, Any], *, auto: bool = False) -> list[str]:
        """Why this backend cannot run ``op`` on ``inputs`` (empty: it can). ``auto``: for an
        automatic choice rather than an explicit request."""
        if op not in self.kernels:
            return [f"has no '{op}' kernel"]
        reasons = []
        dev = _device_type(inputs)
        if self.device_types is not None and dev is not None and dev not in self.device_types:
            return [f"runs on {'/'.join(self.device_types)}, not on '{dev}' tensors"]
        if auto and self.auto_device_types is not None and dev is not None and dev not in self.auto_device_types:
            if not self.auto_device_types:
                return ["is never chosen automatically (request it explicitly)"]
            # the kernel's own check (which may be costly, e.g. building an extension) is skipped
            return [f"is chosen automatically only for {'/'.join(self.auto_device_types)} tensors "
                    f"(request it explicitly for '{dev}')"]
        check = self.kernels[op].check
        if check is not None:
            reasons.extend(check(**inputs))
        return reasons

    def run(self, op: str, **inputs):
        return self.kernels[op].fn(**inputs)

    def accepts(self, op: str, name: str) -> bool:
        """Whether this backend's ``op`` kernel takes the optional keyword ``name``."""
        try:
            return name in inspect.signature(self.kernels[op].fn).parameters
        except (TypeError, ValueError, KeyError):
            return False


def _device_type(inputs: dict[str, Any]) -> str | None:
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device.type
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            return v[0].device.type
    return None


_loaded: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The backend object, or a string saying why it cannot be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name]).BACKEND
        except Exception as exc:  # an optional dependency is missing or broken
            _loaded[name] = f"not importable: {type(exc).__name__}: {exc}"
    return _loaded[name]


def list_backends() -> list[str]:
    """Names of all known backends, in automatic-choice order (importable or not)."""
    return list(AUTO_ORDER)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ValueError for an unknown name and BackendError
    when it cannot be imported here."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}")
    b = _load(name)
    if isinstance(b, str):
        raise BackendError(f"backend {name!r} is {b}")
    return b


def select(op: str, backend: str | None, inputs: dict[str, Any]) -> Backend:
    """Pick the backend for ``op`` on ``inputs`` (see the module docstring for the rules)."""
    requested = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if requested is not None:
        b = get_backend(requested)
        reasons = b.reasons(op, inputs)
        if reasons:
            src = "backend=" if backend is not None else f"{ENV_VAR}="
            raise BackendError(
                f"{op}: requested backend {src}{requested!r} cannot run this input: " + "; ".join(reasons)
            )
        return b
    all_reasons = []
    for name in AUTO_ORDER:
        b = _load(name)
        if isinstance(b, str):
            all_reasons.append(f"{name}: {b}")
            continue
        reasons = b.reasons(op, inputs, auto=True)
        if not reasons:
            return b
        all_reasons.append(f"{name}: " + "; ".join(reasons))
    raise BackendError(f"{op}: no backend can run this input:\n  " + "\n  ".join(all_reasons))


def dispatch(op: str, backend: str | None, **inputs):
    """Run ``op`` on the selected backend."""
    return select(op, backend, inputs).run(op, **inputs)
