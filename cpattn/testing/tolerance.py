"""The project's tolerance rule: errors tied to the error of plain PyTorch at the same precision.

A backend result ``got`` is compared with the float64 oracle ``ref``. The allowed error is
``factor`` (2 by default) times the error that the same math written in plain PyTorch at the
input's precision (``baseline``, e.g. ``cpattn.reference.attention(..., dtype=torch.bfloat16)``)
makes against the same oracle, with a floor of one unit in the last place of the output dtype
at the result's magnitude (rounding the exact answer to the output dtype alone costs half that).

A single plain computation's max error is a noisy statistic when the output is small: at
float32 its rounding (mostly of the row's log-sum-exp, shared by every element of a row) is
sometimes far below its usual size, and a tolerance of 2x such a lucky draw rejects a kernel
that errs less than plain PyTorch on average (issue 11 item 12: the Triton varlen kernel, 1.7
ulps mean max error against plain float32's 2.4 over 300 draws, failed once at 2.08x a 1.3-ulp
plain error). ``baseline`` may therefore be a sequence of plain computations at the same
precision that differ only in summation order (e.g. the keys of each sequence reversed): the
plain error is the largest of theirs. The factor and the floor stay as they are.

:func:`plain_attention` builds such baselines for varlen attention (what the Triton and the
AscendC attention kernels are judged by): ``cpattn.reference.attention`` at the input's precision
with each sequence's keys as given and reversed (positions move with their keys), and the
channels of q and k as given and reversed: four computations, equal in exact arithmetic. Both
dimensions matter: with few keys the key order hardly changes the rounding, and the scores'
float32 rounding, amplified by the softmax, then dominates the output's error (an AscendC draw
with 2 keys: plain float32 erred 0.2 ulp in both key orders, the kernel 2.6 ulps, a faithful
float32 replay of the kernel's arithmetic 3 ulps; docs/ascendc.md "Testing the attention kernels").

Used by the test suite (tests/tolerance.py re-exports it) and by the device check
(bench/device_check.py), so both judge results by the same rule.
"""
from __future__ import annotations

import torch

__all__ = ["ulp_floor", "max_err", "compare", "assert_close", "plain_attention"]


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


def compare(got: torch.Tensor, ref: torch.Tensor, baseline, *, dtype: torch.dtype,
            factor: float = 2.0) -> dict:
    """The rule's verdict without asserting: ``{"ok", "err", "tol", "plain_err"}``. ``baseline``:
    one plain same-precision result, or a sequence of them (summation orders; the largest error
    counts)."""
    err = max_err(got, ref)
    baselines = [baseline] if isinstance(baseline, torch.Tensor) else list(baseline)
    base = max(max_err(b, ref) for b in baselines)
    tol = factor * max(base, ulp_floor(ref, dtype))
    return {"ok": bool(err <= tol), "err": err, "tol": tol, "plain_err": base}


def assert_close(got: torch.Tensor, ref: torch.Tensor, baseline, *, dtype: torch.dtype,
                 factor: float = 2.0, what: str = "out") -> None:
    """``got`` errs against ``ref`` at most ``factor`` x what ``baseline`` errs (ulp floor)."""
    c = compare(got, ref, baseline, dtype=dtype, factor=factor)
    assert c["ok"], (f"{what}: max error {c['err']:.3e} > {c['tol']:.3e} "
                     f"({factor}x plain {dtype} error {c['plain_err']:.3e})")


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dtype: torch.dtype,
                    **kw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Plain ``cpattn.reference.attention(q, k, v, **kw, dtype=dtype)`` in four summation orders,
    equal in exact arithmetic: each sequence's keys (``kw["cu_seqlens_k"]``) as given or reversed
    with their positions (the order of the softmax sums and of ``p @ v``), times the channels of
    ``q`` and ``k`` as given or reversed (the order of the score dot products). Returns
    ``([out, ...], [lse, ...])``, outputs in ``dtype`` and LSEs as the reference gives them: the
    ``baseline`` lists for :func:`assert_close`."""
    from cpattn import reference
    from cpattn.backends.positions import default_positions

    cu_q = [int(x) for x in kw["cu_seqlens_q"]]
    cu_k = [int(x) for x in kw["cu_seqlens_k"]]
    idx = torch.cat([torch.arange(b - 1, a - 1, -1) for a, b in zip(cu_k[:-1], cu_k[1:])]
                    + [torch.zeros(0, dtype=torch.int64)])
    dq, dk = default_positions(cu_q, cu_k, "cpu")
    kp = kw.get("k_positions")
    kw_rev = {**kw, "q_positions": kw.get("q_positions", dq), "k_positions": (dk if kp is None else kp.cpu())[idx]}
    outs, lses = [], []
    for kk, vv, a in ((k, v, kw), (k[idx], v[idx], kw_rev)):
        for qq, kc in ((q, kk), (q.flip(-1), kk.flip(-1))):
            o, lse = reference.attention(qq, kc, vv, **a, dtype=dtype)
            outs.append(o.to(dtype))
            lses.append(lse)
    return outs, lses
