"""The oracle itself, checked against a scalar loop that follows the definition word by word."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from cpattn import reference
from conftest import examples
from hypothesis import settings


def loop_attention(q, k, v, cu_q, cu_k, causal, scale, q_pos=None, k_pos=None):
    """One query, one head at a time, in Python floats."""
    Tq, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    out = torch.zeros(Tq, Hq, Dv, dtype=torch.float64)
    lse = torch.full((Tq, Hq), -math.inf, dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        lq, lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(lq):
            qi = cu_q[b] + i
            pq = q_pos[qi] if q_pos is not None else i + lk - lq
            for h in range(Hq):
                kh = h // (Hq // Hkv)
                scores, vals = [], []
                for j in range(lk):
                    kj = cu_k[b] + j
                    pk = k_pos[kj] if k_pos is not None else j
                    if causal and pk > pq:
                        continue
                    scores.append(scale * sum(float(q[qi, h, d]) * float(k[kj, kh, d]) for d in range(D)))
                    vals.append([float(x) for x in v[kj, kh]])
                if not scores:
                    continue
                m = max(scores)
                z = sum(math.exp(s - m) for s in scores)
                lse[qi, h] = m + math.log(z)
                for s, vv in zip(scores, vals):
                    for d in range(Dv):
                        out[qi, h, d] += math.exp(s - m) / z * vv[d]
    return out, lse


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    lq = draw(st.lists(st.integers(0, 4), min_size=B, max_size=B))
    lk = [draw(st.integers(0, 5)) for _ in range(B)]
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    d = draw(st.integers(1, 4))
    dv = draw(st.integers(1, 4))
    causal = draw(st.booleans())
    explicit_pos = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return lq, lk, hq, hkv, d, dv, causal, explicit_pos, seed


@settings(max_examples=examples(60, 2000))
@given(problems())
def test_reference_attention_matches_loop(p):
    lq, lk, hq, hkv, d, dv, causal, explicit_pos, seed = p
    g = torch.Generator().manual_seed(seed)
    cu_q = [0] + list(torch.tensor(lq).cumsum(0).tolist())
    cu_k = [0] + list(torch.tensor(lk).cumsum(0).tolist())
    q = torch.randn(cu_q[-1], hq, d, generator=g)
    k = torch.randn(cu_k[-1], hkv, d, generator=g)
    v = torch.randn(cu_k[-1], hkv, dv, generator=g)
    q_pos = k_pos = None
    if explicit_pos:  # arbitrary positions, not the bottom-right default
        q_pos = torch.randint(0, 6, (cu_q[-1],), generator=g)
        k_pos = torch.randint(0, 6, (cu_k[-1],), generator=g)
    scale = 0.7
    out, lse = reference.attention(
        q, k, v, cu_seqlens_q=torch.tensor(cu_q), cu_seqlens_k=torch.tensor(cu_k), causal=causal, scale=scale,
        q_positions=q_pos, k_positions=k_pos,
    )
    exp_out, exp_lse = loop_attention(q, k, v, cu_q, cu_k, causal, scale,
                                      None if q_pos is None else q_pos.tolist(),
                                      None if k_pos is None else k_pos.tolist())
    assert out.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-10, atol=1e-10)


def test_reference_defaults_bottom_right_and_scale():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 3)
    out, lse = reference.attention(q, k, v, causal=True)
    exp_out, exp_lse = loop_attention(q, k, v, [0, 2], [0, 5], True, 0.5)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)


def test_reference_query_without_keys_is_empty_state():
    q = torch.randn(3, 2, 4)
    k, v = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    # queries at positions 0..2, keys at 5, 6: nothing visible
    out, lse = reference.attention(q, k, v, causal=True, q_positions=torch.arange(3),
                                   k_positions=torch.tensor([5, 6]))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_reference_merge_of_split_equals_whole(n):
    torch.manual_seed(n)
    q, k, v = torch.randn(4, 2, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 5)
    whole = reference.attention(q, k, v)
    cuts = [0, 2, 9] if n == 2 else ([0, 9] if n == 1 else [0, 3, 3, 9])  # n=3 has an empty part
    parts = [reference.attention(q, k[a:b], v[a:b]) for a, b in zip(cuts, cuts[1:])]
    out, lse = reference.merge_n([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, whole[1], rtol=1e-12, atol=1e-12)
