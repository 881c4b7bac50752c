"""NaN and inf through the Triton paged and varlen kernels, against plain float64 attention
written out here, query by query, over the keys each query sees.

What plain attention does and the kernels must do: a NaN query, or a NaN/+inf score from a
NaN/inf key entry, makes that query's row NaN; a -inf score only drops that key; a NaN/inf in a
visible V entry reaches the output channels it touches. The kernels' LSE of a NaN row is NaN
(plain attention's ``logsumexp`` says ``+inf`` when the culprit is a ``+inf`` score; the kernels
do not tell the two apart). A query that sees no key stays exactly ``(0, -inf)``.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import examples
from tolerance import assert_close

pytest.importorskip("triton", reason="the triton package is not installed (pip install cpattn[triton])")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POISONS = ["q_nan", "k_nan", "k_posinf", "k_neginf", "v_nan", "v_inf", "none"]


def plain(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float, dtype):
    """``q [T, H, D]``; ``keys[t] [n_t, H, D]`` and ``values[t] [n_t, H, Dv]``: what query ``t``
    sees (KV heads already repeated). Plain softmax attention at ``dtype``; no key: (0, -inf)."""
    T, H, _ = q.shape
    dv = values[0].shape[-1]
    out = torch.zeros(T, H, dv, dtype=dtype)
    lse = torch.full((T, H), -math.inf, dtype=dtype)
    for t in range(T):
        if keys[t].shape[0] == 0:
            continue
        s = torch.einsum("hd,nhd->hn", q[t].to(dtype), keys[t].to(dtype)) * scale
        lse[t] = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[t][:, None])
        out[t] = torch.einsum("hn,nhd->hd", p, values[t].to(dtype))
    return out, lse


def _poison(kind: str, q, k_rows, v_rows, gen):
    """Put one non-finite value into a query or into a key/value row that some query sees."""
    if kind == "none":
        return
    if kind == "q_nan":
        if q.shape[0] == 0:
            return
        q[int(torch.randint(0, q.shape[0], (1,), generator=gen)), 0, 0] = math.nan
        return
    rows = k_rows if kind.startswith("k") else v_rows
    cands = [i for i, r in enumerate(rows) if r.shape[0] > 0]
    if not cands:
        return
    r = rows[cands[int(torch.randint(0, len(cands), (1,), generator=gen))]]
    j = int(torch.randint(0, r.shape[0], (1,), generator=gen))
    r[j, 0, int(torch.randint(0, r.shape[-1], (1,), generator=gen))] = {
        "k_nan": math.nan, "k_posinf": math.inf, "k_neginf": -math.inf, "v_nan": math.nan, "v_inf": math.inf,
    }[kind]


def _check(out, lse, q, seen_k, seen_v, scale, dtype, empty):
    ref_o, ref_l = plain(q, seen_k, seen_v, scale, torch.float64)
    base_o, base_l = plain(q, seen_k, seen_v, scale, dtype)
    out, lse = out.cpu(), lse.cpu()
    # poisoned rows, as cpattn.reference says: plain attention's NaN/+inf LSE, and its -inf LSE on
    # a row that sees keys (every visible score -inf from an inf input; plain's output is then
    # 0/0 = NaN but its LSE -inf, which a merge would take for an empty row and drop)
    want_nan_lse = torch.isnan(ref_l) | torch.isposinf(ref_l) | (torch.isneginf(ref_l) & ~empty[:, None])
    assert torch.equal(torch.isnan(out), torch.isnan(ref_o)), "NaN outputs must be where plain attention's are"
    assert torch.equal(torch.isnan(lse), want_nan_lse)
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all()), "no key: exactly (0, -inf)"
    ok = ~want_nan_lse
    assert_close(out[ok], ref_o[ok], base_o[ok].to(dtype), dtype=dtype)
    assert_close(lse[ok], ref_l[ok], base_l[ok], dtype=torch.float32, what="lse")


@settings(max_examples=examples(6, 300))
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(POISONS), dtype=st.sampled_from(DTYPES),
       mla=st.booleans(), bs=st.sampled_from([1, 4, 16]))
def test_paged_kernel_nonfinite_like_plain_attention(seed, kind, dtype, mla, bs):
    from cpattn.backends import get_backend

    g = torch.Generator().manual_seed(seed)
    B, hkv, group, d, dv = 2, 1 if mla else 2, 3, 24, 16
    lens = torch.randint(0, 20, (B,), generator=g)
    nq = torch.randint(1, 4, (B,), generator=g)
    mb = max(1, int((lens.max() + bs - 1) // bs))
    nb = B * mb + 1
    table = torch.randperm(nb, generator=g)[: B * mb].view(B, mb).to(torch.int32)
    k_rows = [torch.randn(int(n), hkv, d, generator=g).to(dtype) for n in lens]
    v_rows = [r[..., :dv] if mla else torch.randn(int(r.shape[0]), hkv, dv, generator=g).to(dtype) for r in k_rows]
    T = int(nq.sum())
    q = torch.randn(T, hkv * group, d, generator=g).to(dtype)
    _poison(kind, q, k_rows, v_rows, g)
    k_cache = torch.full((nb, bs, hkv, d), math.nan, dtype=dtype)  # unused slots: NaN, never read
    v_cache = None if mla else torch.full((nb, bs, hkv, dv), math.nan, dtype=dtype)
    for b in range(B):
        n = int(lens[b])
        slots = table[b].long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs
        k_cache.view(-1, hkv, d)[slots] = k_rows[b]
        if v_cache is not None:
            v_cache.view(-1, hkv, dv)[slots] = v_rows[b]
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), nq.cumsum(0)]).to(torch.int32)
    req = torch.repeat_interleave(torch.arange(B), nq)
    vis = (torch.rand(T, generator=g) * (lens[req] + 1).float()).floor().to(torch.int32)
    out, lse = get_backend("triton").run(
        "paged_attention", q=q.to(DEVICE), k_cache=k_cache.to(DEVICE),
        v_cache=None if v_cache is None else v_cache.to(DEVICE), block_table=table.to(DEVICE),
        query_start_loc=qsl.to(DEVICE), visible_lens=vis.to(DEVICE), scale=0.2, v_head_dim=dv,
        max_query_len=int(nq.max()), max_kv_len=int(vis.max()))
    seen_k = [k_rows[int(req[t])][: int(vis[t])].repeat_interleave(group, dim=1) for t in range(T)]
    seen_v = [v_rows[int(req[t])][: int(vis[t])].repeat_interleave(group, dim=1) for t in range(T)]
    _check(out, lse, q, seen_k, seen_v, 0.2, dtype, vis == 0)


@settings(max_examples=examples(6, 300))
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(POISONS), dtype=st.sampled_from(DTYPES),
       causal=st.booleans(), lens=st.lists(st.integers(0, 20), min_size=1, max_size=3))
def test_varlen_kernel_nonfinite_like_plain_attention(seed, kind, dtype, causal, lens):
    """Causal with a poisoned V row: the poison goes on a key every query of its sequence sees
    (see the varlen kernel's docstring for why a V row hidden from some queries of a tile may
    reach them)."""
    from cpattn.backends import get_backend

    g = torch.Generator().manual_seed(seed)
    hkv, group, d, dv = 2, 2, 16, 24
    lk = [n + int(torch.randint(0, 4, (1,), generator=g)) for n in lens]
    q = torch.randn(sum(lens), hkv * group, d, generator=g).to(dtype)
    k_rows = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in lk]
    v_rows = [torch.randn(n, hkv, dv, generator=g).to(dtype) for n in lk]
    if causal and kind.startswith("v"):  # key 0 (position 0): seen by every query of its sequence
        v_first = [r[:1] for r in v_rows]
        _poison(kind, q, k_rows, v_first, g)
    else:
        _poison(kind, q, k_rows, v_rows, g)
    cu_q = torch.tensor([0] + lens).cumsum(0)
    cu_k = torch.tensor([0] + lk).cumsum(0)
    out, lse = get_backend("triton").run(
        "attention", q=q.to(DEVICE), k=torch.cat(k_rows).to(DEVICE), v=torch.cat(v_rows).to(DEVICE),
        cu_seqlens_q=cu_q.to(DEVICE), cu_seqlens_k=cu_k.to(DEVICE), causal=causal, scale=0.3)
    seen_k, seen_v, empty = [], [], []
    for b, (n, m) in enumerate(zip(lens, lk)):
        for i in range(n):
            vis = (m - n + i + 1) if causal else m  # default positions: bottom-right aligned
            seen_k.append(k_rows[b][:vis].repeat_interleave(group, dim=1))
            seen_v.append(v_rows[b][:vis].repeat_interleave(group, dim=1))
            empty.append(vis == 0)
    if not seen_k:
        assert out.shape[0] == 0
        return
    _check(out, lse, q, seen_k, seen_v, 0.3, dtype, torch.tensor(empty))
