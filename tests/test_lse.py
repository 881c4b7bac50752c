"""Adapters between cpattn's LSE contract and the foreign forms other libraries produce."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cpattn import lse as L
from cpattn import reference
from conftest import examples

INF = float("inf")


def _scores(seed, T=5, H=3, K=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, K, generator=g, dtype=torch.float64) * 4


@settings(max_examples=examples(30, 1000))
@given(st.integers(0, 2**31 - 1))
def test_base2_round_trip_and_meaning(seed):
    s = _scores(seed)
    natural = torch.logsumexp(s, -1)
    base2 = torch.log2(torch.exp2(s / math.log(2)).sum(-1))  # FlashInfer's form: log2 sum 2^(s*log2 e)
    torch.testing.assert_close(L.from_base2(base2.float()), natural.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(L.to_base2(natural.float()), base2.float(), rtol=1e-5, atol=1e-5)
    assert L.from_base2(base2).dtype == torch.float32


def test_base2_keeps_special_values():
    x = torch.tensor([-INF, INF, float("nan"), 0.0])
    y = L.from_base2(x)
    assert torch.isneginf(y[0]) and torch.isposinf(y[1]) and torch.isnan(y[2]) and y[3] == 0
    assert torch.isneginf(L.sanitize(y)[:3]).all()


def test_head_major_token_major():
    x = torch.arange(6.0).view(2, 3)  # [H=2, T=3]
    t = L.head_major_to_token_major(x)
    assert t.shape == (3, 2) and t.is_contiguous() and t.dtype == torch.float32
    assert t[1, 0] == x[0, 1]
    assert torch.equal(L.token_major_to_head_major(t), x)
    b = torch.randn(4, 2, 3)  # batched [B, H, S] -> [B, S, H]
    assert torch.equal(L.head_major_to_token_major(b), b.transpose(1, 2))
    with pytest.raises(ValueError, match="at least 2 dims"):
        L.head_major_to_token_major(torch.zeros(3))


@settings(max_examples=examples(30, 1000))
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_from_max_sum(seed, base2):
    s = _scores(seed)
    m = s.max(-1).values
    if base2:  # Ascend / FlashInfer style statistics in base-2 units
        s2 = s / math.log(2)
        m2 = s2.max(-1).values
        got = L.from_max_sum(m2, torch.exp2(s2 - m2[..., None]).sum(-1), base2=True)
    else:
        got = L.from_max_sum(m, torch.exp(s - m[..., None]).sum(-1))
    torch.testing.assert_close(got, torch.logsumexp(s, -1).float(), rtol=1e-5, atol=1e-5)


def test_from_max_sum_empty_rows_and_errors():
    got = L.from_max_sum(torch.tensor([-INF, 1.0, 2.0]), torch.tensor([0.0, 0.0, 1.0]))
    assert torch.isneginf(got[:2]).all() and got[2] == 2.0
    with pytest.raises(ValueError, match="same shape"):
        L.from_max_sum(torch.zeros(2), torch.zeros(3))


def test_empty_state_is_merge_identity_in_reference():
    out, lse = L.empty_state((3, 2), 4, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and torch.isneginf(lse).all()
    x, lx = torch.randn(3, 2, 4), torch.randn(3, 2)
    mo, ml = reference.merge(x, lx, out, lse)
    torch.testing.assert_close(mo, x.double())
    torch.testing.assert_close(ml, lx.double())


def test_is_empty():
    assert L.is_empty(torch.tensor([-INF, INF, float("nan"), 3.0])).tolist() == [True, True, True, False]
