"""Finding NaN/inf cheaply: the checks behind the kernels' NaN rule (:mod:`cpattn.reference`).

``torch.isfinite`` is an elementwise op (on CPU several passes: ``abs``, ``!=``, ``==``, ``*``)
that writes a bool tensor as large as its input, which a reduction then reads again. Over the
K/V chunks of a decode step or the q/k/v of a prefill that costs more than the attention's own
memory traffic: on the 2-core CPU of docs/performance.md, ``isfinite(x).all(-1)`` took about
15 ms for 2M bfloat16/float32 values where ``amax(-1)`` plus ``amin(-1)`` took about 0.6 ms and
a whole-tensor ``aminmax`` 0.4 ms. The reductions are exact: ``amax``/``amin`` propagate NaN and
return ``+inf``/``-inf`` when one is present, and unlike a sum they cannot overflow on finite
values.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMS = 1 << 20  # 16-bit inputs are checked in float32 slices of this many values


def bad_rows(x: torch.Tensor, source: torch.dtype | None = None) -> torch.Tensor:
    """``[..., D] -> [...]`` bool: the rows holding a NaN or an inf (no host read).

    ``source``: the dtype ``x`` was converted from (its finite values are bounded by that dtype's
    largest); when ``D`` of them cannot sum past ``x``'s largest value (float32 data in float64,
    float16 data in float32), one sum decides exactly and replaces the two reductions."""
    d = x.shape[-1]
    if d == 0:  # nothing to reduce (amax refuses an empty dim): no row holds anything
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    if source is not None and torch.finfo(source).max * d < torch.finfo(x.dtype).max:
        return ~torch.isfinite(x.sum(dim=-1))
    if x.element_size() >= 4 or x.dim() < 2:
        return ~(torch.isfinite(x.amax(dim=-1)) & torch.isfinite(x.amin(dim=-1)))
    # 16-bit: ATen's reductions over the last dim are about 3x slower than float32 conversion plus
    # float32 reductions; convert slices of about _CHUNK_ELEMS values (a bounded temporary)
    step = max(1, _CHUNK_ELEMS // max(x[:1].numel(), 1))
    return torch.cat([bad_rows(x[i:i + step].float(), x.dtype) for i in range(0, x.shape[0], step)]) \
        if x.shape[0] else torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds only finite values: one min/max pass, then a HOST READ (a device sync
    off CPU: only where host reads are allowed)."""
    return x.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def poison_(out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor) -> None:
    """NaN into ``out[rows]`` (every channel) and ``lse[rows]``, in place (no host read).
    ``out [..., D]`` is multiplied by 1 or NaN per row (exact: ``x * 1 == x``): on CPU a
    broadcast ``masked_fill_`` over ``out`` cost about 3x that multiply."""
    out.mul_(torch.where(rows, float("nan"), 1.0).to(out.dtype).unsqueeze(-1))
    lse.masked_fill_(rows, float("nan"))
