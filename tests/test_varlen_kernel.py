"""The local varlen attention kernel ("attention") against the float64 oracle, both CPU paths."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn import reference
from cpattn.backends import dispatch
from cpattn.backends.pytorch import varlen
from conftest import examples
from tolerance import assert_close, max_err


@st.composite
def cases(draw):
    b = draw(st.integers(1, 4))
    lq = draw(st.lists(st.integers(0, 70), min_size=b, max_size=b))
    lk = draw(st.lists(st.integers(0, 70), min_size=b, max_size=b))
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 4]))
    dqk, dv = draw(st.sampled_from([(16, 16), (24, 16), (16, 24)]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    causal = draw(st.booleans())
    # positions: sorted stretches (as PCP makes them) or anything at all (duplicates, gaps)
    scattered = draw(st.booleans())
    return lq, lk, hkv * g, hkv, dqk, dv, dtype, causal, scattered, draw(st.integers(0, 2**31 - 1))


def _positions(lens, scattered, gen):
    out = []
    for L in lens:
        if scattered:
            out.append(torch.randint(0, 80, (L,), generator=gen))
        else:
            cut = int(torch.randint(0, L + 1, (1,), generator=gen)) if L else 0
            out.append(torch.cat([torch.arange(cut), torch.arange(cut + 5, cut + 5 + L - cut)]))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@pytest.mark.parametrize("flash", [True, False], ids=["aten-flash", "generic"])
@settings(max_examples=examples(25, 500))
@given(case=cases())
def test_kernel_matches_oracle(flash, case):
    lq, lk, hq, hkv, dqk, dv, dtype, causal, scattered, seed = case
    gen = torch.Generator().manual_seed(seed)
    cuq = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist())
    cuk = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist())
    q = torch.randn(sum(lq), hq, dqk, generator=gen).to(dtype)
    k = torch.randn(sum(lk), hkv, dqk, generator=gen).to(dtype)
    v = torch.randn(sum(lk), hkv, dv, generator=gen).to(dtype)
    qp, kp = _positions(lq, scattered, gen), _positions(lk, scattered, gen)
    old = varlen.USE_ATEN_FLASH
    varlen.USE_ATEN_FLASH = flash
    try:
        out, lse = dispatch("attention", "pytorch", q=q, k=k, v=v, cu_seqlens_q=cuq, cu_seqlens_k=cuk,
                            q_positions=qp, k_positions=kp, causal=causal, scale=0.4)
    finally:
        varlen.USE_ATEN_FLASH = old
    kw = dict(cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=causal, scale=0.4, q_positions=qp, k_positions=kp)
    ro, rl = reference.attention(q, k, v, **kw)
    bo, bl = reference.attention(q, k, v, **kw, dtype=dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (q.shape[0], hq, dv) and lse.shape == (q.shape[0], hq)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "rows that see no key must be exactly -inf"
    assert bool((out[torch.isinf(lse)] == 0).all()), "rows that see no key must be 0"
    if dtype == torch.float64:
        # plain PyTorch in float64 *is* the oracle (error 0): any other summation order is a few
        # ulps off, so float64 gets an explicit bound instead of the same-precision rule
        assert max_err(out, ro) <= 1e-12 and max_err(lse, rl) <= 1e-5  # LSE is float32 by contract
    else:
        assert_close(out, ro, bo.to(dtype), dtype=dtype)
        assert_close(lse, rl, bl, dtype=torch.float32, what="lse")


def test_default_positions_are_bottom_right_aligned():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 8, generator=gen) for n in (3, 9, 9))
    cuq, cuk = torch.tensor([0, 3]), torch.tensor([0, 9])
    out, lse = varlen.attention(q, k, v, cuq, cuk, causal=True)
    ro, rl = reference.attention(q, k, v, cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=True)
    assert torch.allclose(out.double(), ro, atol=1e-6) and torch.allclose(lse.double(), rl, atol=1e-6)


def test_reference_backend_kernel():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(5, 4, 8, generator=gen), torch.randn(7, 2, 8, generator=gen), torch.randn(7, 2, 4, generator=gen)
    cuq, cuk = torch.tensor([0, 2, 5]), torch.tensor([0, 3, 7])
    out, lse = dispatch("attention", "reference", q=q, k=k, v=v, cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=True)
    ro, rl = reference.attention(q, k, v, cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.allclose(out.double(), ro, atol=1e-6) and torch.allclose(lse.double(), rl, atol=1e-6)


@settings(max_examples=examples(150, 5000))
@given(a=st.integers(0, 40), m=st.integers(1, 30), c=st.integers(0, 40), n=st.integers(1, 30))
def test_tiles_cover_exactly_the_visible_pairs(a, m, c, n):
    """A query run at positions [a, a+m) and a key run at [c, c+n): the tiles hold every visible
    (query, key) pair once, and a block the causal mask hides entirely yields no tile at all."""
    visible = {(i, j) for i in range(m) for j in range(n) if c + j <= a + i}
    covered = []
    for q0, q1, k0, k1, triangle in varlen._tiles((0, m, a), (0, n, c)):
        for i in range(q0, q1):
            for j in range(k0, k1):
                if not triangle or (j - k0) <= (i - q0):
                    covered.append((i, j))
    assert len(covered) == len(set(covered)) and set(covered) == visible
    if not visible:
        assert varlen._tiles((0, m, a), (0, n, c)) == []
