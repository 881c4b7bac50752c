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

__all__ = ["poisoned_rows", "poison", "widen_partials"]


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


def widen_partials(outs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """16-bit partials merged into a float32 ``out`` (PCP's ring accumulator) as float32 copies:
    exact, so a kernel that reads one dtype can merge them."""
    return [o if o.dtype == dtype else o.to(dtype) for o in outs]


def widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether :func:`widen_partials` makes a ``src`` partial readable as ``dst``."""
    return src == dst or (dst == torch.float32 and src in (torch.float16, torch.bfloat16))
