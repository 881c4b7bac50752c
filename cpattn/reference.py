"""The oracle: plain PyTorch in float64, written to be checked by reading.

Every fast path in cpattn is tested against these functions. They are slow on purpose: no
chunking, no fusion, no cleverness. Results are **float64** (``out`` and ``lse``), so that tests
can measure the error of any backend against them.

LSE convention (see :mod:`cpattn.lse`): natural log, token-major, ``-inf`` for a row that sees
no key (with ``out = 0`` there); input LSEs of ``+inf`` or NaN are empty.

NaN and inf inputs are never hidden: a row whose query, or the key or value of a key it sees,
holds a NaN or an inf comes out as NaN (every ``out`` element and the ``lse``): wherever plain
float64 softmax attention gives a NaN or an inf, this says NaN (and also where plain softmax
would quietly drop a key whose score an inf turned into ``-inf``). Keys a row does not see
(masked by causality, or in another sequence) cannot affect it, whatever they hold.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["attention", "merge", "merge_n"]

NEG_INF = float("-inf")


def _bounds(cu: torch.Tensor | None, total: int) -> list[int]:
    return [0, total] if cu is None else [int(x) for x in cu.tolist()]


def visible_keys(q0: int, q1: int, k0: int, k1: int, causal: bool, q_positions: torch.Tensor | None,
                 k_positions: torch.Tensor | None) -> torch.Tensor:
    """``[Lq, Lk]`` bool (CPU): which keys ``k0:k1`` of a sequence its queries ``q0:q1`` see (all
    of them, or by position when ``causal``; default positions as :func:`attention` says)."""
    lq, lk = q1 - q0, k1 - k0
    if not causal:
        return torch.ones(lq, lk, dtype=torch.bool)
    pq = (torch.arange(lq) + (lk - lq)) if q_positions is None else q_positions[q0:q1]
    pk = torch.arange(lk) if k_positions is None else k_positions[k0:k1]
    return pk.cpu()[None, :] <= pq.cpu()[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a packed varlen batch, in float64.

    Shapes: ``q [Tq, Hq, Dqk]``, ``k [Tk, Hkv, Dqk]``, ``v [Tk, Hkv, Dv]``; ``Hq % Hkv == 0``
    (query head ``h`` uses KV head ``h // (Hq // Hkv)``). ``cu_seqlens_q [B+1]`` and
    ``cu_seqlens_k [B+1]`` delimit the sequences (``None``: one sequence). ``scale`` defaults to
    ``1 / sqrt(Dqk)``.

    Causal masking compares positions: a query sees the keys of its own sequence whose position
    is ``<=`` its own. Default positions: keys ``0 .. Lk-1``; queries ``Lk-Lq .. Lk-1``
    (bottom-right alignment: the last query sits at the last key). ``q_positions [Tq]`` and
    ``k_positions [Tk]`` override them.

    Returns ``out [Tq, Hq, Dv]`` and ``lse [Tq, Hq]``, both float64. A query that sees no key gets
    ``out = 0`` and ``lse = -inf``. A query row that sees a key and whose ``q`` row, or the ``k``
    or ``v`` row of a key it sees, holds a NaN or inf is *poisoned*: its ``out`` and ``lse`` are
    NaN (see the module docstring).

    ``dtype`` runs the same math at another precision; tests use it (float32, bfloat16, ...) as
    the "plain PyTorch at the same precision" baseline that sets their tolerances.
    """
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    Dv = v.shape[-1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    bq, bk = _bounds(cu_seqlens_q, Tq), _bounds(cu_seqlens_k, Tk)
    out = torch.zeros(Tq, Hq, Dv, dtype=dtype, device=q.device)
    lse = torch.full((Tq, Hq), NEG_INF, dtype=dtype, device=q.device)
    for b in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[b], bq[b + 1], bk[b], bk[b + 1]
        if q1 == q0:
            continue
        qs = q[q0:q1].to(dtype)
        ks = k[k0:k1].to(dtype).repeat_interleave(group, dim=1)  # [Lk, Hq, D]
        vs = v[k0:k1].to(dtype).repeat_interleave(group, dim=1)  # [Lk, Hq, Dv]
        lq, lk = q1 - q0, k1 - k0
        visible = visible_keys(q0, q1, k0, k1, causal, q_positions, k_positions).to(q.device)  # [Lq, Lk]
        # Poisoned rows: a NaN/inf in the query row, or in the key or value of a key the row sees.
        q_bad = ~torch.isfinite(qs).all(dim=-1)  # [Lq, Hq]
        kv_bad = ~(torch.isfinite(ks).all(dim=-1) & torch.isfinite(vs).all(dim=-1))  # [Lk, Hq]
        sees_bad = (visible.float() @ kv_bad.float()) > 0  # [Lq, Hq]
        poisoned = visible.any(dim=-1)[:, None] & (q_bad | sees_bad)
        # The other rows are computed on inputs whose non-finite values are zeroed: they never see
        # those values, but 0 * NaN (a masked key's weight times its value) would still be NaN.
        qs, ks, vs = (x.nan_to_num(0.0, 0.0, 0.0) for x in (qs, ks, vs))
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale  # [Hq, Lq, Lk]
        s = s.masked_fill(~visible, NEG_INF)
        row_lse = torch.logsumexp(s, dim=-1)  # [Hq, Lq]; -inf where nothing is visible
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)  # rows with no key: 0
        o = torch.einsum("hqk,khd->qhd", p, vs)
        out[q0:q1] = o.masked_fill(poisoned[..., None], math.nan)
        lse[q0:q1] = row_lse.transpose(0, 1).masked_fill(poisoned, math.nan)
    return out, lse


def merge_n(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], *, dtype: torch.dtype = torch.float64,
    nan_propagate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial results over disjoint key sets, in float64.

    ``outs[i] [..., D]`` and ``lses[i] [...]``. An LSE of ``+inf`` or NaN counts as empty and its
    ``out`` rows are ignored. Returns float64 ``(out [..., D], lse [...])``; all-empty rows give
    ``(0, -inf)``.

    ``nan_propagate=True`` is the strict rule cpattn uses inside DCP and PCP, where partials come
    from its own kernels (which mark a poisoned row with a NaN LSE): an input LSE of NaN or
    ``+inf`` then makes the merged row NaN (``out`` and ``lse``) instead of counting as empty.

    ``dtype`` runs the ``out`` math at another precision (LSE math then runs in float32 at least):
    the same-precision baseline for tests.
    """
    lse_dtype = torch.promote_types(dtype, torch.float32)
    lse = torch.stack([x.to(lse_dtype) for x in lses])  # [N, ...]
    bad = torch.isnan(lse) | torch.isposinf(lse)
    poisoned = bad.any(dim=0) if nan_propagate else torch.zeros_like(bad[0])
    lse = lse.masked_fill(bad, NEG_INF)
    m = lse.max(dim=0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all empty: any finite shift
    w = torch.exp(lse - m)  # [N, ...], 0 for empty inputs
    total = w.sum(dim=0)
    merged_lse = m + torch.log(total)  # -inf when total == 0
    frac = torch.where(total > 0, w / total, torch.zeros_like(w))
    merged_out = torch.zeros_like(outs[0], dtype=dtype)
    for i, o in enumerate(outs):
        contrib = frac[i][..., None].to(dtype) * o.to(dtype)
        merged_out += torch.where(frac[i][..., None] > 0, contrib, torch.zeros_like(contrib))
    merged_out = merged_out.masked_fill(poisoned[..., None], math.nan)
    return merged_out, merged_lse.masked_fill(poisoned, math.nan)


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
    *, dtype: torch.dtype = torch.float64, nan_propagate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-way :func:`merge_n`."""
    return merge_n([out_a, out_b], [lse_a, lse_b], dtype=dtype, nan_propagate=nan_propagate)
