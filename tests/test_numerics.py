"""NaN, inf and scale (issue 11, item 3 and 4): nothing hides a NaN or inf that a row sees.

The rule (cpattn.reference, docs/reliability.md): a row that sees at least one key, and whose
query, or the key or value of a key it sees, holds a NaN or inf is *poisoned*: ``out`` and
``lse`` NaN. Rows that see no key stay ``(0, -inf)``; keys a row does not see never affect it.
Every kernel and every distributed op is checked against the oracle, NaN pattern included
(tests/tolerance.max_err counts a NaN mismatch as an infinite error). PCP with a causal mask and
a scale <= 0 is checked on the default backend.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn
import _numerics_ranks as NR
import pcp_ranks
from cpattn import layout, reference
from cpattn.backends import dispatch, get_backend
from cpattn.backends.pytorch import finite, paged, varlen
from conftest import examples
from tolerance import assert_close

NAN, INF = float("nan"), float("inf")
VALUES = [NAN, INF, -INF]


def plain_rows(q, k, v, cu_q, cu_k, causal, scale, q_pos=None, k_pos=None):
    """Plain float64 softmax attention, one row at a time over the keys it sees (a key it does
    not see is left out, so 0 * NaN cannot enter), and which rows see a non-finite value.
    Returns ``(out [Tq, Hq, Dv], sees_poison [Tq, Hq], sees_any [Tq])``."""
    Tq, Hq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    out = torch.zeros(Tq, Hq, Dv, dtype=torch.float64)
    sees_poison = torch.zeros(Tq, Hq, dtype=torch.bool)
    sees_any = torch.zeros(Tq, dtype=torch.bool)
    for b in range(len(cu_q) - 1):
        lq, lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(lq):
            t = cu_q[b] + i
            pq = q_pos[t] if q_pos is not None else i + lk - lq
            keys = [cu_k[b] + j for j in range(lk)
                    if not causal or (k_pos[cu_k[b] + j] if k_pos is not None else j) <= pq]
            sees_any[t] = bool(keys)
            if not keys:
                continue
            for h in range(Hq):
                kh = h // (Hq // Hkv)
                ks, vs = k[keys, kh].double(), v[keys, kh].double()
                sees_poison[t, h] = not (torch.isfinite(q[t, h]).all() and torch.isfinite(ks).all()
                                         and torch.isfinite(vs).all())
                p = torch.softmax(ks @ q[t, h].double() * scale, dim=0)
                out[t, h] = p @ vs
    return out, sees_poison, sees_any


# ------------------------------------------------------------------ the oracle


def test_reference_nan_query_gives_nan_row_not_zeros():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4), torch.randn(5, 2, 4), torch.randn(5, 2, 4)
    q[1, 0, 2] = NAN
    out, lse = reference.attention(q, k, v)
    assert torch.isnan(out[1, 0]).all() and torch.isnan(lse[1, 0])
    clean, clean_lse = reference.attention(q.nan_to_num(0.0), k, v)
    mask = torch.ones(3, 2, dtype=torch.bool)
    mask[1, 0] = False
    assert torch.equal(out[mask], clean[mask]) and torch.equal(lse[mask], clean_lse[mask])


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    lq = draw(st.lists(st.integers(0, 4), min_size=B, max_size=B))
    lk = draw(st.lists(st.integers(0, 6), min_size=B, max_size=B))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    d, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    where = dict(tensor=draw(st.sampled_from(["q", "k", "v"])), row=draw(st.integers(0, 50)),
                 head=draw(st.integers(0, 5)), chan=draw(st.integers(0, 5)), value=draw(st.sampled_from(VALUES)))
    return lq, lk, hq, hkv, d, dv, draw(st.booleans()), draw(st.booleans()), where, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=examples(80, 2000))
@given(p=problems())
def test_reference_says_nan_wherever_plain_attention_is_not_finite(p):
    lq, lk, hq, hkv, d, dv, causal, explicit, where, seed = p
    g = torch.Generator().manual_seed(seed)
    cu_q = [0] + torch.tensor(lq).cumsum(0).tolist()
    cu_k = [0] + torch.tensor(lk).cumsum(0).tolist()
    t = {"q": torch.randn(cu_q[-1], hq, d, generator=g), "k": torch.randn(cu_k[-1], hkv, d, generator=g),
         "v": torch.randn(cu_k[-1], hkv, dv, generator=g)}
    clean = dict(t)
    t[where["tensor"]] = NR.poison(t[where["tensor"]], where["row"], where["head"], where["chan"], where["value"])
    q_pos = k_pos = None
    if explicit:
        q_pos = torch.randint(0, 7, (cu_q[-1],), generator=g)
        k_pos = torch.randint(0, 7, (cu_k[-1],), generator=g)
    kw = dict(cu_seqlens_q=torch.tensor(cu_q), cu_seqlens_k=torch.tensor(cu_k), causal=causal, scale=0.6,
              q_positions=q_pos, k_positions=k_pos)
    out, lse = reference.attention(t["q"], t["k"], t["v"], **kw)
    c_out, c_lse = reference.attention(clean["q"], clean["k"], clean["v"], **kw)
    plain, sees_poison, sees_any = plain_rows(t["q"], t["k"], t["v"], cu_q, cu_k, causal, 0.6,
                                              None if q_pos is None else q_pos.tolist(),
                                              None if k_pos is None else k_pos.tolist())
    nan_rows = torch.isnan(lse)
    assert torch.equal(nan_rows, sees_poison), "NaN exactly in the rows that see a NaN/inf"
    assert torch.equal(torch.isnan(out).all(dim=-1), nan_rows) and not torch.isnan(out[~nan_rows]).any()
    assert not (~torch.isfinite(plain).any(dim=-1) & ~nan_rows).any(), "plain attention not finite, oracle finite"
    # the other rows: exactly what they were without the poison; rows seeing no key: (0, -inf)
    assert torch.equal(out[~nan_rows], c_out[~nan_rows]) and torch.equal(lse[~nan_rows], c_lse[~nan_rows])
    assert torch.isneginf(lse[~sees_any]).all() and (out[~sees_any] == 0).all()


@pytest.mark.parametrize("backend", ["pytorch", "reference", "triton"])
@settings(max_examples=examples(15, 300))
@given(n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_strict_merge_propagates_nan_and_keeps_other_rows(backend, n, seed, dtype):
    """``nan_propagate=True`` (DCP/PCP's internal merges): a NaN or +inf input LSE makes the row
    NaN; every other row is bit for bit the public merge's."""
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton package is not installed (pip install cpattn[triton])")
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(6, 3, 5, generator=g).to(dtype) for _ in range(n)]
    lses = [torch.randn(6, 3, generator=g) * 3 for _ in range(n)]
    lses[0][0, 0] = -INF  # an empty input stays empty
    lses[-1][1, 2] = NAN
    lses[0][2, 1] = INF
    lses[n // 2][3] = -INF
    bad = torch.zeros(6, 3, dtype=torch.bool)
    bad[1, 2] = bad[2, 1] = True
    be = get_backend(backend)
    got_o, got_l = torch.empty_like(outs[0]), torch.empty(6, 3)
    be.run("merge", outs=outs, lses=lses, out=got_o, out_lse=got_l, nan_propagate=True)
    pub_o, pub_l = cpattn.merge_attn_states_n(outs, lses, backend=backend)
    assert torch.isnan(got_o[bad]).all() and torch.isnan(got_l[bad]).all()
    assert torch.equal(got_o[~bad], pub_o[~bad]) and torch.equal(got_l[~bad], pub_l[~bad])
    assert not torch.isnan(pub_o).any() and not torch.isnan(pub_l).any(), "the public merge keeps its contract"


# ------------------------------------------------------------------ the PyTorch kernels


@st.composite
def varlen_cases(draw):
    b = draw(st.integers(1, 3))
    lq = draw(st.lists(st.integers(0, 20), min_size=b, max_size=b))
    lk = draw(st.lists(st.integers(0, 20), min_size=b, max_size=b))
    hkv = draw(st.sampled_from([1, 2]))
    dqk, dv = draw(st.sampled_from([(8, 8), (16, 8), (8, 16)]))
    where = dict(tensor=draw(st.sampled_from(["q", "k", "v"])), row=draw(st.integers(0, 100)),
                 head=draw(st.integers(0, 8)), chan=draw(st.integers(0, 16)), value=draw(st.sampled_from(VALUES)))
    return dict(lq=lq, lk=lk, hkv=hkv, hq=hkv * draw(st.sampled_from([1, 2])), dqk=dqk, dv=dv,
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), causal=draw(st.booleans()),
                scattered=draw(st.booleans()), scale=draw(st.sampled_from([0.4, -0.4, 0.0])),
                poisoned=draw(st.booleans()), where=where, seed=draw(st.integers(0, 2**31 - 1)))


def _varlen_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    cuq = torch.tensor([0] + torch.tensor(c["lq"]).cumsum(0).tolist())
    cuk = torch.tensor([0] + torch.tensor(c["lk"]).cumsum(0).tolist())
    t = {"q": torch.randn(int(cuq[-1]), c["hq"], c["dqk"], generator=gen).to(c["dtype"]),
         "k": torch.randn(int(cuk[-1]), c["hkv"], c["dqk"], generator=gen).to(c["dtype"]),
         "v": torch.randn(int(cuk[-1]), c["hkv"], c["dv"], generator=gen).to(c["dtype"])}
    if c["poisoned"]:
        w = c["where"]
        t[w["tensor"]] = NR.poison(t[w["tensor"]], w["row"], w["head"], w["chan"], w["value"])
    pos = []
    for lens in (c["lq"], c["lk"]):
        if c["scattered"]:
            pos.append(torch.randint(0, 25, (sum(lens),), generator=gen))
        else:
            pos.append(torch.cat([torch.arange(n) + 2 for n in lens]) if lens else torch.zeros(0, dtype=torch.long))
    return t, cuq, cuk, pos[0], pos[1]


@pytest.mark.parametrize("flash", [True, False], ids=["aten-flash", "generic"])
@settings(max_examples=examples(40, 500))
@given(c=varlen_cases())
def test_varlen_kernel_nan_and_scale_match_oracle(flash, c):
    t, cuq, cuk, qp, kp = _varlen_inputs(c)
    keep = {n: x.clone() for n, x in t.items()}
    old = varlen.USE_ATEN_FLASH
    varlen.USE_ATEN_FLASH = flash
    try:
        out, lse = dispatch("attention", "pytorch", q=t["q"], k=t["k"], v=t["v"], cu_seqlens_q=cuq, cu_seqlens_k=cuk,
                            q_positions=qp, k_positions=kp, causal=c["causal"], scale=c["scale"])
    finally:
        varlen.USE_ATEN_FLASH = old
    for n in t:  # the kernel cleans copies, never the caller's tensors
        assert torch.equal(t[n].nan_to_num(1.0, 2.0, 3.0), keep[n].nan_to_num(1.0, 2.0, 3.0))
    kw = dict(cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=c["causal"], scale=c["scale"], q_positions=qp, k_positions=kp)
    ro, rl = reference.attention(t["q"], t["k"], t["v"], **kw)
    bo, bl = reference.attention(t["q"], t["k"], t["v"], **kw, dtype=c["dtype"])
    assert torch.equal(torch.isnan(lse), torch.isnan(rl)) and torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    assert_close(out, ro, bo.to(c["dtype"]), dtype=c["dtype"])
    assert_close(lse, rl, bl, dtype=torch.float32, what="lse")


@st.composite
def paged_cases(draw):
    mla = draw(st.booleans())
    hkv = 1 if mla else draw(st.sampled_from([1, 2]))
    B = draw(st.integers(1, 3))
    nq = [draw(st.integers(1, 3)) for _ in range(B)]
    lens = [n + draw(st.integers(0, 30)) for n in nq]
    where = dict(tensor=draw(st.sampled_from(["q", "k", "v"])), row=draw(st.integers(0, 200)),
                 head=draw(st.integers(0, 8)), chan=draw(st.integers(0, 16)), value=draw(st.sampled_from(VALUES)))
    return dict(mla=mla, hkv=hkv, hq=hkv * draw(st.sampled_from([1, 2])), dqk=8, dv=8 if not mla else 4,
                bs=draw(st.sampled_from([1, 4, 16])), lens=lens, nq=nq, il=1, heads="replicated",
                dtype=draw(st.sampled_from(["float32", "bfloat16"])), chunk=draw(st.sampled_from([1, 64, 1 << 21])),
                host_checks=draw(st.booleans()), where=where, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=examples(40, 1000))
@given(c=paged_cases())
def test_paged_kernel_nan_matches_oracle(c):
    """Including a NaN in a key that a later query of the same request sees but an earlier one
    does not (masked: weight 0 x NaN must not reach the earlier query)."""
    cs = NR.poisoned_case(c, c["where"])
    dt = cs["q"].dtype
    sh = layout.shard_kv(cs["k"], cs["v"], cs["seq_lens"], world_size=1, block_size=c["bs"], spare_blocks=1,
                         generator=torch.Generator().manual_seed(c["seed"]), fill=NAN)[0]
    pos, _ = layout.query_positions(cs["seq_lens"], cs["qsl"])
    old = paged._CHUNK_ELEMS, paged.HOST_CHECKS
    paged._CHUNK_ELEMS, paged.HOST_CHECKS = c["chunk"], c["host_checks"]  # False: the off-CPU path
    try:
        out, lse = paged.paged_attention(cs["q"], sh.k_cache, sh.v_cache, sh.block_table, cs["qsl"], pos + 1,
                                         c["dqk"] ** -0.5, c["dv"], max(c["nq"]), max(c["lens"]))
    finally:
        paged._CHUNK_ELEMS, paged.HOST_CHECKS = old
    v = cs["k"][..., :c["dv"]] if c["mla"] else cs["v"]
    kw = dict(cu_seqlens_q=cs["qsl"].long(), cu_seqlens_k=torch.tensor([0] + c["lens"]).cumsum(0), causal=True)
    ro, rl = reference.attention(cs["q"], cs["k"], v, **kw)
    bo, bl = reference.attention(cs["q"], cs["k"], v, dtype=dt, **kw)
    assert torch.equal(torch.isnan(lse), torch.isnan(rl))
    assert_close(out, ro, bo, dtype=dt)
    assert_close(lse, rl, bl, dtype=torch.float32, what="lse")


def test_paged_kernel_masked_nan_value_does_not_reach_earlier_query():
    """Request of 6 keys, 2 queries (positions 4 and 5): a NaN in V at position 5 is seen by the
    second query only; the first must be exactly what it is without the NaN."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    sh = layout.shard_kv(k, v, torch.tensor([6]), world_size=1, block_size=8)[0]
    args = (q, sh.k_cache, None, sh.block_table, torch.tensor([0, 2]), torch.tensor([5, 6]), 0.3, 8, 2, 6)
    vc = sh.v_cache.clone()
    vc[0, 5, 1, 3] = NAN
    for host_checks in (True, False):
        paged.HOST_CHECKS = host_checks
        try:
            clean = paged.paged_attention(*args[:2], sh.v_cache, *args[3:])
            out, lse = paged.paged_attention(*args[:2], vc, *args[3:])
        finally:
            paged.HOST_CHECKS = True
        assert torch.equal(out[0], clean[0][0]) and torch.equal(lse[0], clean[1][0])
        assert torch.isnan(out[1, 1]).all() and torch.isnan(lse[1, 1]) and torch.equal(out[1, 0], clean[0][1, 0])


@settings(max_examples=examples(40, 1000))
@given(dt=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=3), chunk=st.sampled_from([1, 7, 1 << 20]),
       spots=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(VALUES + ["max", "-max"])), max_size=6))
def test_finite_helpers_are_exact(dt, shape, chunk, spots):
    """finite.bad_rows (amax/amin, 16-bit in float32 slices) marks exactly the rows isfinite would,
    huge finite values included (a sum would overflow); poison_ leaves other rows bitwise alone."""
    x = torch.randn(shape).to(dt)
    big = torch.finfo(dt).max
    for i, val in spots:
        if x.numel():
            x.view(-1)[i % x.numel()] = {"max": big, "-max": -big}.get(val, val)
    old, finite._CHUNK_ELEMS = finite._CHUNK_ELEMS, chunk
    try:
        got = finite.bad_rows(x)
    finally:
        finite._CHUNK_ELEMS = old
    assert torch.equal(got, ~torch.isfinite(x).all(dim=-1)) and got.shape == x.shape[:-1]
    assert finite.all_finite(x) == bool(torch.isfinite(x).all())
    if x.dim() >= 2:
        out, lse = x.clone(), torch.randn(x.shape[:-1])
        rows = torch.rand(x.shape[:-1]) < 0.5
        finite.poison_(out, lse, rows)
        assert torch.isnan(out[rows]).all() and torch.isnan(lse[rows]).all()
        keep = ~rows
        assert torch.equal(out[keep].view(torch.uint8), x[keep].contiguous().view(torch.uint8))


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("value", VALUES)
def test_paged_kernel_one_query_per_request_without_host_reads(where, value):
    """DCP's shape of call (one query per request) on the no-host-read path, which then cleans
    nothing: a NaN/inf at a live key poisons exactly its request's rows that see it (its KV
    head's), one past a request's length or in a garbage block changes nothing, and huge finite
    values are not taken for inf. Bitwise the same as the host-read path (NaN bits aside)."""
    torch.manual_seed(5)
    lens = [7, 12, 3]  # request 1's last block (block size 8) has 4 slots past its length
    B, hq, hkv, d = len(lens), 4, 2, 8
    k, v = torch.randn(sum(lens), hkv, d), torch.randn(sum(lens), hkv, d)
    k[0, 0, 0] = torch.finfo(torch.float32).max / 4  # finite, absurd: a sum would overflow
    q = torch.randn(B, hq, d)
    sh = layout.shard_kv(k, v, torch.tensor(lens), world_size=1, block_size=8, spare_blocks=1)[0]
    table = sh.block_table
    args = dict(q=q, block_table=table, query_start_loc=torch.arange(B + 1), visible_lens=torch.tensor(lens),
                scale=0.3, v_head_dim=d, max_query_len=1, max_kv_len=max(lens))
    cache = {"k": sh.k_cache, "v": sh.v_cache}

    def run(**caches):
        res = []
        for host_checks in (True, False):
            paged.HOST_CHECKS = host_checks
            try:
                res.append(paged.paged_attention(k_cache=caches["k"], v_cache=caches["v"], **args))
            finally:
                paged.HOST_CHECKS = True
        for x1, x2 in zip(*res):  # the same NaNs, and bitwise the same numbers elsewhere
            nan = torch.isnan(x1)
            assert torch.equal(nan, torch.isnan(x2)) and torch.equal(x1[~nan], x2[~nan])
        return res[0]

    clean_o, clean_l = run(**cache)
    assert torch.isfinite(clean_l).all()
    live = (int(table[1, 1]), 2, 1)  # request 1, position 10, KV head 1
    dead = (int(table[1, 1]), 6, 1)  # request 1, position 14 >= 12: past its length
    spare = (int(sh.k_cache.shape[0]) - 1, 0, 0)  # a block no request uses
    for spot, seen in ((live, True), (dead, False), (spare, False)):
        bad = dict(cache)
        bad[where] = cache[where].clone()
        bad[where][spot[0], spot[1], spot[2], 3] = value
        o, l = run(**bad)
        hit = torch.zeros(B, hq, dtype=torch.bool)
        if seen:
            hit[1, 2:] = True  # query heads 2, 3 use KV head 1
        assert torch.equal(torch.isnan(l), hit) and torch.isnan(o[hit]).all()
        assert torch.equal(o[~hit], clean_o[~hit]) and torch.equal(l[~hit], clean_l[~hit])


# ------------------------------------------------------------------ DCP and PCP on gloo ranks


def _dcp_oracle(p, where):
    c = NR.poisoned_case(p, where)
    v = c["k"][..., :p["dv"]] if p["mla"] else c["v"]
    kw = dict(cu_seqlens_q=c["qsl"].long(), cu_seqlens_k=torch.tensor([0] + p["lens"]).cumsum(0), causal=True)
    return reference.attention(c["q"], c["k"], v, **kw), reference.attention(c["q"], c["k"], v,
                                                                              dtype=c["q"].dtype, **kw)


def _check_dcp(p, where, results):
    (ro, rl), (bo, bl) = _dcp_oracle(p, where)
    s = p["hq"] // p["world"] if p["heads"] == "sharded" else p["hq"]
    for r, res in enumerate(results):
        h = slice(r * s, (r + 1) * s) if p["heads"] == "sharded" else slice(None)
        for cmb, (out, lse) in res.items():
            assert torch.equal(torch.isnan(lse), torch.isnan(rl[:, h])), f"rank {r} {cmb}: NaN rows differ"
            assert_close(out, ro[:, h], bo[:, h], dtype=out.dtype, what=f"rank {r} {cmb} out")
            assert_close(lse, rl[:, h], bl[:, h], dtype=torch.float32, what=f"rank {r} {cmb} lse")
    return rl


DCP_BASE = dict(seed=7, world=3, bs=4, il=1, mla=False, heads="replicated", hq=4, hkv=2, dqk=8, dv=8,
                lens=[13, 20, 6], nq=[1, 3, 2], dtype="bfloat16")


@pytest.mark.distributed
@pytest.mark.parametrize("heads", ["replicated", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dcp_nan_in_one_ranks_live_cache_entry_gives_nan_rows(gloo, heads, dtype):
    """Token 17 of request 1 (global key row 13 + 17 = 30) lives on rank 17 % 3 = 2; queries of
    request 1 sit at positions 17, 18, 19: all three see it. Before the fix that rank's partial
    was dropped by the merge and every rank returned finite numbers."""
    p = {**DCP_BASE, "heads": heads, "dtype": dtype, "hq": 6 if heads == "sharded" else 4}
    combines = ["all_gather", "lse_reduce"] + (["all_to_all"] if heads == "sharded" else [])
    for where in (dict(tensor="k", row=30, head=1, chan=2, value=NAN),
                  dict(tensor="v", row=30, head=0, chan=5, value=INF),
                  dict(tensor="q", row=0, head=3, chan=1, value=NAN)):
        res = gloo(3).run(NR.dcp_poisoned, p, where, combines)
        rl = _check_dcp({**p, "world": 3}, where, res)
        assert torch.isnan(rl).any()
        if where["tensor"] == "k":
            g = p["hq"] // p["hkv"]  # query heads of KV head 1: g .. 2g-1
            assert torch.isnan(rl[1:4, g:2 * g]).all() and not torch.isnan(rl[:, :g]).any()


@st.composite
def dcp_cases(draw):
    world = draw(st.sampled_from([1, 2, 3]))
    mla = draw(st.booleans())
    heads = draw(st.sampled_from(["replicated", "sharded"]))
    hkv = 1 if mla else draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2])) * (world if heads == "sharded" else 1)
    B = draw(st.integers(1, 3))
    nq = [draw(st.integers(1, 3)) for _ in range(B)]
    lens = [n + draw(st.integers(0, 25)) for n in nq]
    bs = draw(st.sampled_from([2, 4]))
    where = dict(tensor=draw(st.sampled_from(["q", "k", "v"])), row=draw(st.integers(0, 100)),
                 head=draw(st.integers(0, 8)), chan=draw(st.integers(0, 16)), value=draw(st.sampled_from(VALUES)))
    return dict(seed=draw(st.integers(0, 2**16)), world=world, bs=bs, il=draw(st.sampled_from([1, bs])), mla=mla,
                heads=heads, hq=hq, hkv=hkv, dqk=8, dv=4 if mla else 8, lens=lens, nq=nq,
                dtype=draw(st.sampled_from(["float32", "bfloat16"]))), where


@pytest.mark.distributed
@settings(max_examples=examples(10, 150))
@given(case=dcp_cases())
def test_dcp_poisoned_matches_oracle_every_combine(gloo, case):
    p, where = case
    combines = ["all_gather", "lse_reduce"] + (["all_to_all"] if p["heads"] == "sharded" else [])
    res = gloo(p["world"]).run(NR.dcp_poisoned, p, where, combines)
    _check_dcp(p, where, res)


def _pcp_check(res, seed, lens, hq, hkv, dqk, dv, dtype, causal, where=None, scale=None):
    q, k, v, cu = pcp_ranks.make_batch(seed, lens, hq, hkv, dqk, dv, dtype)
    t = {"q": q, "k": k, "v": v}
    if where is not None:
        t[where["tensor"]] = NR.poison(t[where["tensor"]], where["row"], where["head"], where["chan"], where["value"])
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal, scale=scale)
    ro, rl = reference.attention(t["q"], t["k"], t["v"], **kw)
    bo, bl = reference.attention(t["q"], t["k"], t["v"], **kw, dtype=dtype)
    for r, (i, out, lse) in enumerate(res):
        assert torch.equal(torch.isnan(lse), torch.isnan(rl[i])), f"rank {r}: NaN rows differ"
        assert_close(out, ro[i], bo[i].to(dtype), dtype=dtype, what=f"rank {r} out")
        assert_close(lse, rl[i], bl[i], dtype=torch.float32, what=f"rank {r} lse")
    return rl


@pytest.mark.distributed
@settings(max_examples=examples(8, 100))
@given(n=st.sampled_from([1, 2, 3]), lens=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       causal=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       where=st.fixed_dictionaries(dict(tensor=st.sampled_from(["q", "k", "v"]), row=st.integers(0, 120),
                                         head=st.integers(0, 4), chan=st.integers(0, 16),
                                         value=st.sampled_from(VALUES))),
       seed=st.integers(0, 10_000))
def test_pcp_poisoned_matches_oracle_both_methods(gloo, n, lens, causal, dtype, where, seed):
    for method in ("ring", "allgather"):
        res = gloo(n).run(NR.pcp_poisoned, seed, lens, 4, 2, 16, 8, dtype, causal, method, where)
        _pcp_check(res, seed, lens, 4, 2, 16, 8, dtype, causal, where)


@pytest.mark.distributed
@pytest.mark.parametrize("scale", [-0.7, 0.0, -1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pcp_causal_scale_not_positive_default_backend(gloo, scale, dtype):
    """Issue 11 item 4: NaN or wrong rows before the fix (ATen's flash tiles assumed scale > 0)."""
    lens = [37, 5, 64]
    for method in ("ring", "allgather"):
        res = gloo(2).run(pcp_ranks.prefill, 4, lens, 4, 2, 16, 8, dtype, True, method, scale=scale)
        rl = _pcp_check(res, 4, lens, 4, 2, 16, 8, dtype, True, scale=scale)
        assert torch.isfinite(rl).all()


# ------------------------------------------------------------------ forward only (issue 11, item 13)


def test_dcp_and_pcp_are_forward_only():
    """No backward exists: with inputs that require grad, backward raises (never a silent zero
    gradient); under no_grad nothing is recorded."""
    q = torch.randn(2, 2, 8, requires_grad=True)
    kc, vc = torch.randn(4, 4, 2, 8), torch.randn(4, 4, 2, 8)
    bt, sl = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([5, 7], dtype=torch.int32)
    out = cpattn.dcp_decode_attention(q, kc, vc, bt, sl, group=None)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()
    qp = torch.randn(6, 2, 8, requires_grad=True)
    out = cpattn.pcp_ring_prefill(qp, torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.tensor([0, 6]), group=None)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()
    with torch.no_grad():
        assert not cpattn.dcp_decode_attention(q, kc, vc, bt, sl, group=None).requires_grad


def test_triton_varlen_scale_not_positive_matches_oracle():
    """The Triton varlen kernel masks after scaling, so a scale <= 0 is right there too (checked
    under the CPU interpreter; its NaN handling is the Triton kernel's own, tested with it)."""
    pytest.importorskip("triton", reason="the triton package is not installed (pip install cpattn[triton])")
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(9, 2, 16, generator=g), torch.randn(9, 1, 16, generator=g), torch.randn(9, 1, 16, generator=g)
    cu = torch.tensor([0, 4, 9])
    for scale in (-0.5, 0.0):
        out, lse = dispatch("attention", "triton", q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                            scale=scale)
        ro, rl = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, scale=scale)
        bo, bl = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, scale=scale,
                                     dtype=torch.float32)
        assert_close(out, ro, bo, dtype=torch.float32)
        assert_close(lse, rl, bl, dtype=torch.float32, what="lse")


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["ring", "allgather"])
def test_pcp_nan_in_cached_context_gives_nan_rows(gloo, method):
    """Every prompt token of request 0 sees its whole cached context: a NaN cached value there
    makes exactly request 0's rows of KV head 0's query heads NaN; request 1 is unaffected."""
    clean = gloo(2).run(NR.pcp_context_poisoned, method, False)
    res = gloo(2).run(NR.pcp_context_poisoned, method, True)
    for (i, out, lse), (_, c_out, c_lse) in zip(res, clean):
        want = torch.zeros(lse.shape, dtype=torch.bool)
        want[i < 20, :2] = True  # request 0: global rows 0..19; KV head 0: query heads 0, 1
        assert torch.equal(torch.isnan(lse), want) and torch.equal(torch.isnan(out).all(dim=-1), want)
        assert not torch.isnan(out[~want]).any()
        torch.testing.assert_close(out[~want], c_out[~want], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[~want], c_lse[~want], rtol=1e-6, atol=1e-6)
