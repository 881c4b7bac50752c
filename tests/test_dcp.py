"""DCP decode attention on real gloo ranks (world 1-4) against the float64 oracle on the
unsharded K/V: every combine strategy, both head modes, GQA and MLA, 1-4 query tokens per
request, lengths of 0 and 1 and shorter than ``world * interleave``, three dtypes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn
from cpattn import dcp_combine, reference
from _dcp_ranks import DTYPES, make_case, run_case, run_case_hccl_safe, run_case_in_subgroups, run_without_collectives
from conftest import examples
from tolerance import assert_close

pytestmark = pytest.mark.distributed


@st.composite
def cases(draw, worlds=(1, 2, 3, 4)):
    world = draw(st.sampled_from(worlds))
    bs = draw(st.sampled_from([1, 2, 4, 8]))
    il = draw(st.sampled_from(sorted({1, bs})))
    mla = draw(st.booleans())
    heads = draw(st.sampled_from(["replicated", "sharded"]))
    if mla:
        hkv, dv = 1, draw(st.sampled_from([4, 8]))
        dqk = dv + draw(st.sampled_from([2, 4]))  # latent + rope
        hq = draw(st.sampled_from([1, 2, 4])) * (world if heads == "sharded" else 1)
    else:
        hkv = draw(st.sampled_from([1, 2]))
        group = draw(st.sampled_from([1, 2, 3]))
        hq = hkv * group * (world if heads == "sharded" else 1)
        dqk, dv = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 12]))
    B = draw(st.integers(1, 4))
    nq, lens = [], []
    for _ in range(B):
        kind = draw(st.sampled_from(["normal"] * 6 + ["empty", "no_query"]))
        if kind == "empty":  # a request of length 0 (legal only without query tokens)
            nq.append(0), lens.append(0)
            continue
        n = 0 if kind == "no_query" else draw(st.integers(1, 4))
        nq.append(n)
        lens.append(n + draw(st.one_of(st.integers(0, 3), st.integers(0, 3 * world * il + 5), st.integers(0, 60))))
    if sum(nq) == 0:
        nq[0], lens[0] = 1, max(lens[0], 1)
    return {"seed": draw(st.integers(0, 2**20)), "world": world, "bs": bs, "il": il, "mla": mla, "heads": heads,
            "hq": hq, "hkv": hkv, "dqk": dqk, "dv": dv, "lens": lens, "nq": nq,
            "dtype": draw(st.sampled_from(list(DTYPES)))}


def oracle(p: dict):
    c = make_case(p)
    v = c["k"][..., :p["dv"]] if p["mla"] else c["v"]
    cu_k = torch.tensor([0] + p["lens"]).cumsum(0)
    kw = dict(cu_seqlens_q=c["qsl"].long(), cu_seqlens_k=cu_k, causal=True)  # queries: last tokens (bottom-right)
    ref = reference.attention(c["q"], c["k"], v, **kw)
    base = reference.attention(c["q"], c["k"], v, dtype=DTYPES[p["dtype"]], **kw)
    return ref, base


def check_case(p: dict, results: list[dict]) -> None:
    (ref_o, ref_l), (base_o, base_l) = oracle(p)
    world, dt = p["world"], DTYPES[p["dtype"]]
    s = p["hq"] // world if p["heads"] == "sharded" else p["hq"]
    for r, res in enumerate(results):
        h = slice(r * s, (r + 1) * s) if p["heads"] == "sharded" else slice(None)
        for cmb, (out, lse, _) in res.items():
            assert out.dtype == dt and lse.dtype == torch.float32
            assert out.shape == (sum(p["nq"]), s, p["dv"]) and lse.shape == out.shape[:2]
            assert_close(out, ref_o[:, h], base_o[:, h], dtype=dt, what=f"rank {r} {cmb} out")
            assert_close(lse, ref_l[:, h], base_l[:, h], dtype=torch.float32, what=f"rank {r} {cmb} lse")
    if p["heads"] == "replicated":  # every rank receives the same heads: bitwise the same result
        for cmb in results[0]:
            for r in range(1, world):
                assert torch.equal(results[r][cmb][0], results[0][cmb][0]), f"{cmb}: rank {r} out differs from rank 0"
                assert torch.equal(results[r][cmb][1], results[0][cmb][1]), f"{cmb}: rank {r} lse differs from rank 0"


@settings(max_examples=examples(25, 1000))
@given(p=cases())
def test_dcp_matches_oracle_every_strategy(gloo, p):
    combines = list(dcp_combine.allowed(p["heads"])) + [None]  # None: the default
    check_case(p, gloo(p["world"]).run(run_case, p, combines))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("heads", ["replicated", "sharded"])
def test_reference_backend_agrees(gloo, world, heads):
    """The float64 reference kernel behind the same op and combines."""
    p = {"seed": 5, "world": world, "bs": 4, "il": 4, "mla": False, "heads": heads, "hq": 4 * world, "hkv": 2,
         "dqk": 8, "dv": 8, "lens": [1, 9, 30], "nq": [1, 3, 2], "dtype": "float32", "backend": "reference"}
    check_case(p, gloo(world).run(run_case, p, list(dcp_combine.allowed(heads))))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("heads", ["replicated", "sharded"])
def test_hccl_safe_collectives(gloo, world, heads):
    """Every combine strategy through comm's HCCL paths (float32 queries: float64 partial sums,
    which HCCL cannot all-reduce or reduce-scatter; world 3: no flat all-gather on HCCL)."""
    p = {"seed": 11, "world": world, "bs": 2, "il": 1, "mla": False, "heads": heads, "hq": 2 * world, "hkv": 1,
         "dqk": 8, "dv": 6, "lens": [0, 7, 13], "nq": [0, 2, 1], "dtype": "float32"}
    check_case(p, gloo(world).run(run_case_hccl_safe, p, list(dcp_combine.allowed(heads))))


@pytest.mark.parametrize("heads", ["replicated", "sharded"])
def test_dcp_group_inside_a_larger_world(gloo, heads):
    """The group argument is honoured: two DCP pairs inside a world of 4 compute independently."""
    p = {"seed": 8, "world": 2, "bs": 2, "il": 2, "mla": True, "heads": heads, "hq": 4, "hkv": 1, "dqk": 6,
         "dv": 4, "lens": [5, 12], "nq": [2, 1], "dtype": "float32"}
    res = gloo(4).run(run_case_in_subgroups, p, list(dcp_combine.allowed(heads)))
    check_case(p, res[:2])
    check_case(p, res[2:])


def test_world_one_uses_no_collective(gloo):
    p = {"seed": 3, "world": 1, "bs": 2, "il": 2, "mla": True, "heads": "sharded", "hq": 2, "hkv": 1, "dqk": 10,
         "dv": 8, "lens": [0, 7, 1], "nq": [0, 4, 1], "dtype": "bfloat16"}
    res = gloo(1).run(run_without_collectives, p, list(dcp_combine.allowed("sharded")))
    check_case(p, res)
    assert all(recs == [] for _, _, recs in res[0].values())


def test_query_seeing_no_local_key_is_empty_state(gloo):
    """Length 1 at world 4: ranks 1-3 hold nothing; the LSE stays finite and equals the oracle's
    (the empty partials are the identity)."""
    p = {"seed": 9, "world": 4, "bs": 1, "il": 1, "mla": False, "heads": "replicated", "hq": 2, "hkv": 1, "dqk": 4,
         "dv": 4, "lens": [1, 2], "nq": [1, 2], "dtype": "float32"}
    res = gloo(4).run(run_case, p, ["all_gather"])
    check_case(p, res)
    assert torch.isfinite(res[0]["all_gather"][1]).all()


def _bytes_formula(cmb, heads, n, T, H, Dv, e):
    a = 8 if e == 4 else 4  # partial LSEs and sums: float64 for float32 queries, else float32
    pad = lambda x: -(-x // a) * a  # noqa: E731
    if cmb == "all_gather":
        return {"all_gather": (n - 1) * pad(T * H * (a + Dv * e))}
    if cmb == "lse_reduce" and heads == "replicated":
        return {"all_gather": (n - 1) * T * H * a, "all_reduce": 2 * (n - 1) * T * H * Dv * a // n}
    if cmb == "lse_reduce":
        return {"all_gather": (n - 1) * T * H * a, "reduce_scatter": (n - 1) * T * H * Dv * a // n}
    return {"all_to_all": (n - 1) * pad(T * (H // n) * (a + Dv * e))}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("heads", ["replicated", "sharded"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bytes_sent_match_formula(gloo, world, heads, dtype):
    T, H, Dv, Dqk = 5, 2 * world, 7, 9  # odd sizes exercise the row padding
    p = {"seed": 1, "world": world, "bs": 2, "il": 1, "mla": False, "heads": heads, "hq": H, "hkv": 2, "dqk": Dqk,
         "dv": Dv, "lens": [3, 11, 6], "nq": [1, 3, 1], "dtype": dtype}
    e = torch.empty((), dtype=DTYPES[dtype]).element_size()
    results = gloo(world).run(run_case, p, list(dcp_combine.allowed(heads)) + [None])
    for cmb in list(dcp_combine.allowed(heads)) + [None]:
        used = cmb or dcp_combine.default_strategy(heads, world, T, H, Dv, DTYPES[dtype])
        want = _bytes_formula(used, heads, world, T, H, Dv, e)
        for r, res in enumerate(results):
            recs = res[cmb][2]
            got = {c: s for purpose, c, _, s in recs if purpose == "combine"}
            assert got == want, f"{cmb} rank {r}: sent {got}, formula {want}"
            q_gather = [s for purpose, c, _, s in recs if purpose == "q_gather"]
            assert q_gather == ([(world - 1) * T * (H // world) * Dqk * e] if heads == "sharded" else [])
            assert sum(want.values()) == dcp_combine.expected_bytes(used, heads, world, T, H, Dv, DTYPES[dtype])


def test_default_strategy_rule():
    d = dcp_combine.default_strategy
    assert d("sharded", 4, 10**6, 32, 128, torch.bfloat16) == "all_to_all"
    limit = dcp_combine.ALL_GATHER_MAX_BYTES
    # replicated: all_gather while (N-1) * T*H*Dv*e <= limit, lse_reduce beyond
    assert d("replicated", 2, limit // (32 * 128 * 2), 32, 128, torch.bfloat16) == "all_gather"
    assert d("replicated", 2, limit // (32 * 128 * 2) + 1, 32, 128, torch.bfloat16) == "lse_reduce"
    assert d("replicated", 4, 8, 32, 128, torch.bfloat16) == "all_gather"
    assert d("replicated", 4, 128, 32, 128, torch.bfloat16) == "lse_reduce"
    assert d("replicated", 3, 1000, 4, 8, torch.float32) == "all_gather"
