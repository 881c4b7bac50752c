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
in eight orders, equal in exact arithmetic: the channels of q and k as given and reversed, each
with every sequence's keys as given and reversed (positions move with their keys), then four
seeded channel permutations with the keys alternately as given and reversed. Both dimensions matter: with few keys the key order hardly
changes the rounding, and the scores' float32 rounding, amplified by the softmax, then
dominates the output's error. Measured (docs/ascendc.md "Testing the attention kernels"): on a
1-key draw with Dqk = 72, plain float32's LSE error over 200 channel permutations had median
1.6e-7, 90th percentile 3.2e-7 and maximum 1.2e-6, while the given order erred 8.3e-8 and the
AscendC kernel 2.7e-7; on a 2-key draw plain float32 erred 2.8e-8 in both key orders, up to
2.45e-7 over 40 channel permutations (above the 2x-ulp tolerance: the old rule rejected plain
PyTorch itself), and the kernel 3.05e-7. The ulp floor, tied to the output's magnitude, misses
the error that rounding the scores costs after the softmax, which grows with the scores'
magnitude: :func:`score_floor` is that second floor. :func:`assert_attention_close` puts them
together for attention kernels: 2x the largest of the eight plain errors, floored by the ulp
and by the score floor.

Used by the test suite (tests/tolerance.py re-exports it) and by the device check
(bench/device_check.py), so both judge results by the same rule.
"""
from __future__ import annotations

import torch

__all__ = ["ulp_floor", "max_err", "compare", "assert_close", "plain_attention", "score_floor",
           "assert_attention_close"]


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
            factor: float = 2.0, floor: float = 0.0) -> dict:
    """The rule's verdict without asserting: ``{"ok", "err", "tol", "plain_err"}``. ``baseline``:
    one plain same-precision result, or a sequence of them (summation orders; the largest error
    counts). ``floor``: a further floor under the plain error (e.g. :func:`score_floor`)."""
    err = max_err(got, ref)
    baselines = [baseline] if isinstance(baseline, torch.Tensor) else list(baseline)
    base = max(max_err(b, ref) for b in baselines)
    tol = factor * max(base, ulp_floor(ref, dtype), floor)
    return {"ok": bool(err <= tol), "err": err, "tol": tol, "plain_err": base}


def assert_close(got: torch.Tensor, ref: torch.Tensor, baseline, *, dtype: torch.dtype,
                 factor: float = 2.0, what: str = "out", floor: float = 0.0) -> None:
    """``got`` errs against ``ref`` at most ``factor`` x what ``baseline`` errs (ulp floor, and
    ``floor`` where given)."""
    c = compare(got, ref, baseline, dtype=dtype, factor=factor, floor=floor)
    assert c["ok"], (f"{what}: max error {c['err']:.3e} > {c['tol']:.3e} "
                     f"({factor}x plain {dtype} error {c['plain_err']:.3e})")


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dtype: torch.dtype,
                    orders: int = 8, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Plain ``cpattn.reference.attention(q, k, v, **kw, dtype=dtype)`` in ``orders`` summation
    orders, equal in exact arithmetic: q's and k's channels (the order of the score dot products)
    as given and reversed, each with every sequence's keys (``kw["cu_seqlens_k"]``) as given and
    reversed with their positions (the order of the softmax sums and of ``p @ v``); then channels
    in seeded random permutations, the keys alternately as given and reversed. Returns ``([out, ...], [lse, ...])``, outputs in
    ``dtype`` and LSEs as the reference gives them: the ``baseline`` lists for
    :func:`assert_close`. Deterministic (the permutations come from a fixed seed)."""
    from cpattn import reference
    from cpattn.backends.positions import default_positions

    cu_q = [int(x) for x in kw["cu_seqlens_q"]]
    cu_k = [int(x) for x in kw["cu_seqlens_k"]]
    idx = torch.cat([torch.arange(b - 1, a - 1, -1) for a, b in zip(cu_k[:-1], cu_k[1:])]
                    + [torch.zeros(0, dtype=torch.int64)])
    dq, dk = default_positions(cu_q, cu_k, "cpu")
    kp = kw.get("k_positions")
    kw_rev = {**kw, "q_positions": kw.get("q_positions", dq), "k_positions": (dk if kp is None else kp.cpu())[idx]}
    d = q.shape[-1]
    g = torch.Generator().manual_seed(0)
    ident, rev = torch.arange(d), torch.arange(d - 1, -1, -1)
    plan = [(ident, False), (ident, True), (rev, False), (rev, True)]
    plan += [(torch.randperm(d, generator=g), n % 2 == 1) for n in range(max(orders - 4, 0))]
    outs, lses = [], []
    for ch, keys_reversed in plan[:orders]:
        kk, vv, a = (k[idx], v[idx], kw_rev) if keys_reversed else (k, v, kw)
        o, lse = reference.attention(q[..., ch], kk[..., ch], vv, **a, dtype=dtype)
        outs.append(o.to(dtype))
        lses.append(lse)
    return outs, lses


def score_floor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float | None = None,
                **kw) -> tuple[float, float]:
    """What one rounding of every attention score costs: ``(out_floor, lse_floor)``.

    An attention computed at float32 holds each score ``s_j`` in float32 before the softmax, so
    even a perfect float32 kernel moves ``s_j`` by up to one ulp (``eps |s_j|``; half an ulp if
    correctly rounded, more if the dot product rounds on the way, as every practical one does),
    and the softmax carries that into the outputs: to first order ``out`` moves by up to
    ``eps * sum_j p_j |s_j| |v_j - out|`` and the LSE by ``eps * sum_j p_j |s_j|``. These are
    the largest such bounds over the batch (float64, on the finite rows), with ``eps`` that of
    float32 (the precision the kernels and plain float32 PyTorch compute scores in) unless given.

    Used as ``floor=`` of :func:`assert_close` for attention kernels: the ulp floor is tied to the
    output's magnitude and misses this, which grows with the scores' magnitude. Measured case
    (docs/ascendc.md, "Testing the attention kernels"): 2 keys, scores -1.2 and -1.8, values up
    to 2.4; plain float32 PyTorch with q's and k's channels in another order erred 2.45e-7,
    above 2x the ulp floor (2.38e-7) and 2.2x plain's own error in the given order; this floor
    is 3.6e-7. ``kw``: ``cpattn.reference.attention``'s (cu_seqlens_q/k, causal, scale,
    q_positions, k_positions)."""
    import math

    from cpattn.reference import visible_keys

    eps = torch.finfo(torch.float32).eps if eps is None else eps
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if kw.get("scale") is None else float(kw["scale"])
    cu_q = [int(x) for x in kw["cu_seqlens_q"]]
    cu_k = [int(x) for x in kw["cu_seqlens_k"]]
    fo = fl = 0.0
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        vis = visible_keys(q0, q1, k0, k1, kw.get("causal", False), kw.get("q_positions"), kw.get("k_positions"))
        if q1 == q0 or not bool(vis.any()):
            continue
        ks = k[k0:k1].double().repeat_interleave(group, dim=1)
        vs = v[k0:k1].double().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), ks) * scale  # [Hq, Lq, Lk]
        s = s.masked_fill(~vis, -math.inf)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key: 0
        w = p * s.abs().nan_to_num(0.0, 0.0, 0.0)  # p_j |s_j| (0 where hidden)
        o = torch.einsum("hqk,khd->hqd", p, vs)
        dev = (vs.permute(1, 0, 2)[:, None] - o[:, :, None]).abs()  # [Hq, Lq, Lk, Dv]
        bo = torch.einsum("hqk,hqkd->hqd", w, dev)
        fin_o, fin_l = bo[torch.isfinite(bo)], w.sum(-1)[torch.isfinite(w.sum(-1))]
        fo = max(fo, float(fin_o.max()) if fin_o.numel() else 0.0)
        fl = max(fl, float(fin_l.max()) if fin_l.numel() else 0.0)
    return eps * fo, eps * fl


def assert_attention_close(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, *, dtype: torch.dtype, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule for an attention kernel's ``out`` (in ``dtype``) and float32 ``lse`` on the inputs
    ``q, k, v`` with ``cpattn.reference.attention``'s keywords ``kw``: against the float64 oracle,
    2x the largest error of :func:`plain_attention`'s eight plain computations at ``dtype``, with
    the ulp floor and :func:`score_floor`. Returns the oracle's ``(out, lse)``."""
    from cpattn import reference

    ro, rl = reference.attention(q, k, v, **kw)
    bo, bl = plain_attention(q, k, v, **kw, dtype=dtype)
    fo, fl = score_floor(q, k, v, **kw)
    assert_close(out.cpu(), ro, bo, dtype=dtype, floor=fo)
    assert_close(lse.cpu(), rl, bl, dtype=torch.float32, what="lse", floor=fl)
    return ro, rl
