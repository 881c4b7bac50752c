"""The tolerance rule's attention helpers (cpattn.testing.tolerance): the plain baselines in
several summation orders, the score-rounding floor, and that the rule still rejects wrong kernels."""
from __future__ import annotations

import math

import pytest
import torch

from cpattn import reference
from tolerance import assert_attention_close, plain_attention, score_floor

F32_EPS = torch.finfo(torch.float32).eps


def _case(seed=0, lq=(3, 1), lk=(5, 2), hq=4, hkv=2, d=6, dv=5, causal=True):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor((0,) + lq).cumsum(0)
    cu_k = torch.tensor((0,) + lk).cumsum(0)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=g)
    k = torch.randn(int(cu_k[-1]), hkv, d, generator=g)
    v = torch.randn(int(cu_k[-1]), hkv, dv, generator=g)
    return q, k, v, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, scale=0.7)


def test_score_floor_by_hand():
    """One query, two keys, D = 1: s = (0.5 * 2, 0.5 * -1) = (1, -0.5); the bounds by hand."""
    q = torch.tensor([[[2.0]]])
    k = torch.tensor([[[1.0]], [[-0.5]]])
    v = torch.tensor([[[3.0, -1.0]], [[0.0, 4.0]]])
    cu = dict(cu_seqlens_q=torch.tensor([0, 1]), cu_seqlens_k=torch.tensor([0, 2]), scale=0.5)
    s = [1.0, -0.5]
    p = [math.exp(x) / (math.exp(1.0) + math.exp(-0.5)) for x in s]
    out = [p[0] * 3.0 + p[1] * 0.0, p[0] * -1.0 + p[1] * 4.0]
    vals = [[3.0, -1.0], [0.0, 4.0]]
    want_o = max(sum(p[j] * abs(s[j]) * abs(vals[j][d] - out[d]) for j in range(2)) for d in range(2))
    want_l = sum(p[j] * abs(s[j]) for j in range(2))
    fo, fl = score_floor(q, k, v, **cu)
    assert fo == pytest.approx(F32_EPS * want_o, rel=1e-12)
    assert fl == pytest.approx(F32_EPS * want_l, rel=1e-12)


def test_score_floor_bounds_a_relative_change_of_every_score():
    """Scaling every score by (1 + t) moves out and lse by at most t/eps times the floors (first
    order), and by a fair part of them: the floor is the right size, not a blanket."""
    q, k, v, kw = _case()
    fo, fl = score_floor(q, k, v, **kw)
    t = 1e-7
    o0, l0 = reference.attention(q, k, v, **kw)
    o1, l1 = reference.attention(q, k, v, **{**kw, "scale": kw["scale"] * (1 + t)})
    do = float((o1 - o0).abs().max()) / t * F32_EPS
    dl = float((l1 - l0).abs().max()) / t * F32_EPS
    assert 0.05 * fo < do <= fo * 1.001
    assert 0.05 * fl < dl <= fl * 1.001


def test_score_floor_ignores_rows_that_see_nothing():
    q, k, v, kw = _case(lq=(2, 0), lk=(0, 3))
    assert score_floor(q, k, v, **kw) == (0.0, 0.0)


def test_plain_attention_orders_agree_in_float64():
    q, k, v, kw = _case(seed=1)
    kw["k_positions"] = torch.tensor([4, 0, 3, 1, 2, 0, 1])
    kw["q_positions"] = torch.tensor([2, 3, 4, 1])
    ro, rl = reference.attention(q, k, v, **kw)
    outs, lses = plain_attention(q, k, v, dtype=torch.float64, **kw)
    assert len(outs) == len(lses) == 8
    for o, l in zip(outs, lses):
        torch.testing.assert_close(o, ro, rtol=0, atol=1e-12)
        torch.testing.assert_close(l, rl, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_rule_passes_plain_and_rejects_wrong_kernels(dtype):
    q, k, v, kw = _case(seed=2, lq=(7, 4), lk=(30, 9), d=16, dv=8)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    o, l = reference.attention(q, k, v, **kw, dtype=dtype)
    assert_attention_close(o.to(dtype), l.float(), q, k, v, dtype=dtype, **kw)
    # a key dropped (the last key of sequence 1, 9 keys, hidden from every query)
    kp = torch.cat([torch.arange(30), torch.arange(9)])
    kp[38] = 10**6
    bad_o, bad_l = reference.attention(q, k, v, **{**kw, "k_positions": kp,
                                                   "q_positions": torch.cat([torch.arange(23, 30), torch.arange(5, 9)])})
    with pytest.raises(AssertionError):
        assert_attention_close(bad_o.to(dtype), bad_l.float(), q, k, v, dtype=dtype, **kw)
    # scores rounded to bfloat16 where float32 was asked for
    if dtype == torch.float32:
        wrong = reference.attention(q.bfloat16().float(), k.bfloat16().float(), v, **kw, dtype=torch.float32)
        with pytest.raises(AssertionError):
            assert_attention_close(wrong[0], wrong[1].float(), q, k, v, dtype=dtype, **kw)
