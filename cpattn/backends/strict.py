"""The strict merge rule (``nan_propagate=True``) for merge kernels that only know the public one.

DCP and PCP merge the partials of cpattn's own kernels strictly: a partial poisoned by NaN/inf
(its LSE is NaN or ``+inf``) makes the merged row NaN, ``out`` and ``lse``, instead of being
dropped as empty (the public contract, docs/lse.md). A kernel that implements only the public
rule (the AscendC merge) runs as it is; :func:`poisoned_rows` is taken before it writes (``out``
and ``out_lse`` may alias input 0) and :func:`poison` applies it after. Device ops only: no host
read, so it stays inside a captured graph.
"""
from __future__ import annotations

import torch

__all__ = ["poisoned_rows", "poison", "merge_one_dtype", "ONE_DTYPE"]


def poisoned_rows(lses: list[torch.Tensor]) -> torch.Tensor:
    """``[*rows]`` bool: some input LSE of the row is NaN or ``+inf``."""
    bad = torch.zeros(lses[0].shape, dtype=torch.bool, device=lses[0].device)
    for l in lses:
        bad |= torch.isnan(l) | torch.isposinf(l)
    return bad


def poison(out: torch.Tensor, out_lse: torch.Tensor | None, bad: torch.Tensor) -> None:
    """NaN into the rows ``bad`` marks, in place."""
    out.masked_fill_(bad.view(*bad.shape, 1), float("nan"))
    if out_lse is not None:
        out_lse.masked_fill_(bad, float("nan"))


ONE_DTYPE = (torch.float32, torch.float16, torch.bfloat16)


def merge_one_dtype(kernel, outs, lses, out, out_lse, nan_propagate: bool = False) -> None:
    """Run ``kernel(outs, lses, out, out_lse)`` (a merge kernel that reads one dtype and knows only
    the public rule) for partials of mixed float32/16-bit dtypes and for the strict rule.

    Partials whose dtype differs from ``out``'s (the PCP ring merges 16-bit partials with its float32
    accumulator) are merged in float32: every partial widened (exact), into a float32 ``out`` when
    ``out`` is 16-bit, rounded once at the end. ``nan_propagate``: :func:`poisoned_rows` taken
    before the kernel writes (``out``/``out_lse`` may alias input 0), :func:`poison` after."""
    bad = poisoned_rows(list(lses)) if nan_propagate else None
    if all(o.dtype == out.dtype for o in outs):
        kernel(list(outs), list(lses), out, out_lse)
    else:
        wide = [o.to(torch.float32) for o in outs]  # copies: out may alias one of them
        if out.dtype == torch.float32:
            kernel(wide, list(lses), out, out_lse)
        else:
            tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
            kernel(wide, list(lses), tmp, out_lse)
            out.copy_(tmp)
    if bad is not None:
        poison(out, out_lse, bad)
