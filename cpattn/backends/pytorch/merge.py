"""Fast N-way LSE merge in plain PyTorch (any device).

Why it is faster than the formula most frameworks write (max, subtract, exp, sum, divide, then
multiply and add over the whole ``[N, T, H, D]`` stack): the weights are computed once on the
small ``[N, rows]`` LSE stack, and the ``D``-wide accumulation runs over row chunks of about
1 MiB, so the float32 accumulator stays in cache, every input is read once, the output written
once, and no ``[N, T, H, D]`` temporary is ever allocated.

Empty inputs (LSE ``-inf``, ``+inf`` or NaN) get weight 0 and their rows must be ignored even
when they hold NaN (``0 * NaN`` is NaN), which costs one masking step per input chunk. On CPU a
host check is free, so the masking only runs when some weight is 0; on other devices it always
runs (a host sync would break graph capture).

``nan_propagate=True`` (the strict rule DCP and PCP use on the partials of cpattn's own kernels,
which mark a poisoned row, one that saw a NaN or inf, with a NaN LSE): an input LSE of NaN or
``+inf`` makes the merged row NaN, ``out`` and ``lse``, instead of counting as empty.
"""
from __future__ import annotations

import torch

from ..hostsync import host_reads_allowed

_CHUNK_ELEMS = 1 << 18  # float32 accumulator of about 1 MiB per chunk


def merge_weights(lses: list[torch.Tensor], nan_propagate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input merge weights and the merged LSE.

    ``lses``: N float32 tensors of one shape. Returns ``frac [N, *shape]`` (the weight of each
    input, 0 for empty ones, rows summing to 1 unless all are empty) and ``lse [*shape]``. With
    ``nan_propagate``, rows where some input LSE is NaN or ``+inf`` get NaN weights and LSE.
    """
    lse = torch.stack(lses)
    bad = torch.isnan(lse) | torch.isposinf(lse)
    if nan_propagate:
        poisoned = bad.any(dim=0)
    lse = lse.masked_fill(bad, float("-inf"))
    m = lse.amax(dim=0)
    m = m.masked_fill(~torch.isfinite(m), 0.0)
    w = torch.exp(lse - m)
    total = w.sum(dim=0)
    merged = m + torch.log(total)
    frac = w / total.masked_fill(total == 0, 1.0)
    if nan_propagate:
        frac = frac.masked_fill(poisoned, float("nan"))
        merged = merged.masked_fill(poisoned, float("nan"))
    return frac, merged


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor], out: torch.Tensor, out_lse: torch.Tensor,
          nan_propagate: bool = False) -> None:
    """The ``merge`` kernel. Beyond the registry's float32 contract it also takes float64 LSEs
    (weights and accumulation then run in float64, and ``out``/``out_lse`` may be float64): the
    float64 accumulators that DCP and PCP keep for float32 inputs merge here, on any device,
    whatever backend runs the attention kernels (Triton has no float64)."""
    frac, merged_lse = merge_weights(lses, nan_propagate)  # NaN weights (poisoned rows) are never masked below
    D = out.shape[-1]
    rows = out_lse.numel()
    frac = frac.reshape(len(outs), rows, 1)
    flat_in = [o.reshape(rows, D) for o in outs]
    target = out.view(rows, D) if out.is_contiguous() else torch.empty(rows, D, dtype=out.dtype, device=out.device)
    empty = frac <= 0
    mask = True if out.device.type != "cpu" or not host_reads_allowed() else bool(empty.any())
    step = max(1, _CHUNK_ELEMS // max(D, 1))
    # Two chunk-sized float32 buffers for the whole call (no allocation per chunk and input).
    acc_buf = torch.empty(min(step, rows), D, dtype=frac.dtype, device=out.device)
    tmp_buf = torch.empty_like(acc_buf) if mask else None
    for r0 in range(0, rows if D else 0, step):
        r1 = min(rows, r0 + step)
        acc = acc_buf[: r1 - r0]
        for i, (o, f, e) in enumerate(zip(flat_in, frac, empty)):
            if mask:  # weight 0 must contribute 0 even where the row holds NaN
                c = acc if i == 0 else tmp_buf[: r1 - r0]
                torch.mul(o[r0:r1], f[r0:r1], out=c)
                c.masked_fill_(e[r0:r1], 0.0)
                if i:
                    acc.add_(c)
            elif i == 0:
                torch.mul(o[r0:r1], f[r0:r1], out=acc)
            else:
                acc.addcmul_(o[r0:r1], f[r0:r1])
        target[r0:r1] = acc
    if not out.is_contiguous():
        out.copy_(target.view(out.shape))
    out_lse.copy_(merged_lse)
