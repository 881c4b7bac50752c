"""The project's tolerance rule: errors tied to the error of plain PyTorch at the same precision.

A backend result ``got`` is compared with the float64 oracle ``ref``. The allowed error is
``factor`` (2 by default) times the error that the same math written in plain PyTorch at the
input's precision (``baseline``, e.g. ``cpattn.reference.attention(..., dtype=torch.bfloat16)``)
makes against the same oracle, with a floor of one unit in the last place of the output dtype
at the result's magnitude (rounding the exact answer to the output dtype alone costs half that).

Used by the test suite (tests/tolerance.py re-exports it) and by the device check
(bench/device_check.py), so both judge results by the same rule.
"""
from __future__ import annotations

import torch

__all__ = ["ulp_floor", "max_err", "compare", "assert_close"]


def ulp_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    fin = ref[torch.isfinite(ref)]
    mag = float(fin.abs().max()) if fin.numel() else 1.0
    return torch.finfo(dtype).eps * max(mag, 1.0)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, treating matching infinities as equal; NaN anywhere is an error."""
    a = a.double()
    ref = ref.double().to(a.device)
    if a.shape != ref.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference {tuple(ref.shape)}")
    if a.numel() == 0:
        return 0.0
    if torch.isnan(a).any() != torch.isnan(ref).any() or (torch.isnan(a) != torch.isnan(ref)).any():
        return float("inf")
    same_inf = torch.isinf(a) & torch.isinf(ref) & (torch.sign(a) == torch.sign(ref))
    d = torch.where(same_inf | torch.isnan(ref), torch.zeros_like(a), (a - ref).abs())
    return float(d.max())


def compare(got: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, *, dtype: torch.dtype,
            factor: float = 2.0) -> dict:
    """The rule's verdict without asserting: ``{"ok", "err", "tol", "plain_err"}``."""
    err = max_err(got, ref)
    base = max_err(baseline, ref)
    tol = factor * max(base, ulp_floor(ref, dtype))
    return {"ok": bool(err <= tol), "err": err, "tol": tol, "plain_err": base}


def assert_close(got: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, *, dtype: torch.dtype,
                 factor: float = 2.0, what: str = "out") -> None:
    """``got`` errs against ``ref`` at most ``factor`` x what ``baseline`` errs (ulp floor)."""
    c = compare(got, ref, baseline, dtype=dtype, factor=factor)
    assert c["ok"], (f"{what}: max error {c['err']:.3e} > {c['tol']:.3e} "
                     f"({factor}x plain {dtype} error {c['plain_err']:.3e})")
