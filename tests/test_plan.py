"""The plan/run serving API on real gloo ranks: ``run`` equals the one-call ops and the float64
oracle over several steps with changing lengths and batch sizes (GQA, MLA, both head modes, every
combine, both PCP methods, cached context), padded rows are ``(0, -inf)``, and every ``run`` here
executes with the host-sync calls patched to raise (tests/_sync_guard.py), so each of these
tests also proves its path free of host syncs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn
import pcp_ranks
from _dcp_ranks import DTYPES
from _plan_ranks import dcp_steps, pcp_steps
from cpattn import dcp_combine, reference
from conftest import examples
from test_dcp import cases, oracle
from tolerance import assert_close

pytestmark = pytest.mark.distributed
TIMEOUT = 180  # seconds per multi-step call on a shared 2-core machine (a hang still fails)


@st.composite
def step_series(draw, worlds=(1, 2, 3, 4)):
    """Three steps sharing a plan's static facts, with other lengths, batch sizes, query counts."""
    base = draw(cases(worlds))
    steps = [base]
    for _ in range(2):
        other = draw(cases((base["world"],)))
        steps.append({**base, "seed": other["seed"], "lens": other["lens"], "nq": other["nq"]})
    return steps, draw(st.sampled_from([0, 1, 3]))


def check_dcp(steps, pad, results, combine):
    world = steps[0]["world"]
    dt = DTYPES[steps[0]["dtype"]]
    for i, p in enumerate(steps):
        (ref_o, ref_l), (base_o, base_l) = oracle(p)
        T = sum(p["nq"])
        s = p["hq"] // world if p["heads"] == "sharded" else p["hq"]
        for r, res in enumerate(results):
            h = slice(r * s, (r + 1) * s) if p["heads"] == "sharded" else slice(None)
            for layer, (out, lse, o1, l1) in enumerate(res[i]):
                f = 1.0 if layer == 0 else 0.5  # layer 2 ran q * 0.5: compare with the one-call op only
                what = f"step {i} layer {layer} rank {r} {combine}"
                assert out.shape == (T + pad, s, p["dv"]) and out.dtype == dt and lse.dtype == torch.float32
                if layer == 0:
                    assert_close(out[:T], ref_o[:, h], base_o[:, h], dtype=dt, what=what + " out")
                    assert_close(lse[:T], ref_l[:, h], base_l[:, h], dtype=torch.float32, what=what + " lse")
                # run and the one-call op: the same machinery, within rounding of each other
                assert_close(out[:T], o1.double(), base_o[:, h] if f == 1.0 else o1, dtype=dt, what=what + " vs op")
                assert torch.equal(out[T:], torch.zeros_like(out[T:])), what + ": padded rows must be 0"
                assert torch.isneginf(lse[T:]).all(), what + ": padded rows must have LSE -inf"


@settings(max_examples=examples(6, 300))
@given(series=step_series())
def test_dcp_plan_run_matches_op_and_oracle(gloo, series):
    steps, pad = series
    heads = steps[0]["heads"]
    for combine in dcp_combine.allowed(heads):
        res = gloo(steps[0]["world"]).run(dcp_steps, steps, pad, combine, True, timeout=TIMEOUT)
        check_dcp(steps, pad, res, combine)


_BASE = {"bs": 4, "il": 2, "hkv": 2, "dqk": 8, "dv": 8, "dtype": "bfloat16"}
_LENS = [([9, 30, 2], [1, 2, 1]), ([41, 3, 17, 8], [4, 1, 1, 2]), ([5], [1])]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("heads", ["replicated", "sharded"])
@pytest.mark.parametrize("mla", [False, True])
def test_dcp_every_path_without_host_sync(gloo, world, heads, mla):
    """Every combine of both head modes, GQA and MLA, with padding rows: run() under the patched
    host-sync calls, equal to the one-call op and the oracle."""
    over = {"hkv": 1, "dqk": 10, "dv": 8} if mla else {}
    hq = (2 if mla else 4) * (world if heads == "sharded" else 1)
    steps = [{**_BASE, **over, "seed": s, "world": world, "mla": mla, "heads": heads, "hq": hq, "lens": l, "nq": n}
             for s, (l, n) in enumerate(_LENS)]
    for combine in dcp_combine.allowed(heads):
        check_dcp(steps, 2, gloo(world).run(dcp_steps, steps, 2, combine, True, timeout=TIMEOUT), combine)


def test_dcp_world_one_no_group():
    """World 1 in this process (torch.distributed not initialised): no collective at all."""
    from _plan_ranks import dcp_steps as run_steps

    steps = [{**_BASE, "seed": s, "world": 1, "mla": False, "heads": "replicated", "hq": 4, "lens": l, "nq": n}
             for s, (l, n) in enumerate(_LENS)]
    check_dcp(steps, 3, [run_steps(steps, 3, None, True)], "none")


def _pcp_oracle(b):
    dt = DTYPES[b["dtype"]]
    if b.get("ctx"):
        q, kf, vf, cuq, cuk = pcp_ranks.context_oracle_inputs(b["seed"], b["lens"], b["ctx"], b["hq"], b["hkv"],
                                                              b["dqk"], b["dv"], dt, b.get("mla", False))
        kw = dict(cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=b["causal"])
    else:
        q, kf, vf, cu = pcp_ranks.make_batch(b["seed"], b["lens"], b["hq"], b["hkv"], b["dqk"], b["dv"], dt)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=b["causal"])
    ro, rl = reference.attention(q, kf, vf, **kw)
    bo, bl = reference.attention(q, kf, vf, **kw, dtype=dt)
    return ro, rl, bo.to(dt), bl


def check_pcp(batches, results):
    dt = DTYPES[batches[0]["dtype"]]
    for j, b in enumerate(batches):
        ro, rl, bo, bl = _pcp_oracle(b)
        for r, res in enumerate(results):
            i, out, lse, o1, l1, full = res[j]
            what = f"batch {j} rank {r}"
            assert_close(out, ro[i], bo[i], dtype=dt, what=what + " out")
            assert_close(lse, rl[i], bl[i], dtype=torch.float32, what=what + " lse")
            assert_close(out, o1.double(), bo[i], dtype=dt, what=what + " vs op")
            assert torch.equal(full[i], out), what + ": restore puts this rank's rows at its index"
            assert_close(full, ro, bo, dtype=dt, what=what + " restored")


_PCP = [
    dict(seed=1, lens=[37, 5, 64], hq=4, hkv=2, dqk=16, dv=16, dtype="float32"),
    dict(seed=2, lens=[3, 1, 90, 11], hq=4, hkv=2, dqk=16, dv=16, dtype="float32"),
    dict(seed=3, lens=[20, 9], ctx=[17, 4], hq=4, hkv=2, dqk=16, dv=16, dtype="float32"),
    dict(seed=4, lens=[33], ctx=[0], hq=4, hkv=2, dqk=16, dv=16, dtype="float32"),
    dict(seed=5, lens=[6, 13, 2], ctx=[40, 0, 9], hq=4, hkv=2, dqk=16, dv=16, dtype="float32", il=2),
]


@pytest.mark.parametrize("world, method, causal", [
    (1, "ring", True), (2, "ring", True), (3, "ring", True), (2, "allgather", True), (3, "allgather", True),
    (2, "ring", False), (3, "allgather", False)])
def test_pcp_plan_run_matches_op_and_oracle(gloo, world, method, causal):
    """Five batches through one plan (other lengths and batch sizes, with and without cached
    context), run() under the patched host-sync calls; restore() gives the global order."""
    batches = [{**b, "causal": causal} for b in _PCP]
    check_pcp(batches, gloo(world).run(pcp_steps, batches, method, True, timeout=TIMEOUT))


def test_pcp_plan_mla_dims_and_bf16(gloo):
    batches = [dict(seed=s, lens=l, ctx=c, hq=4, hkv=1, dqk=24, dv=16, dtype="bfloat16", causal=True, mla=True)
               for s, l, c in [(7, [30, 2], [9, 0]), (8, [50], [23])]]
    check_pcp(batches, gloo(2).run(pcp_steps, batches, "ring", True, timeout=TIMEOUT))
    check_pcp(batches, gloo(2).run(pcp_steps, batches, "allgather", True, timeout=TIMEOUT))


def test_guard_catches_the_one_call_ops():
    """The patched calls do catch host reads: the one-call ops (which read metadata on the host)
    raise under them."""
    from _sync_guard import HostSync, forbid_host_syncs
    from _dcp_ranks import local_inputs

    p = {**_BASE, "seed": 1, "world": 1, "mla": False, "heads": "replicated", "hq": 4, "lens": [9, 3], "nq": [1, 1]}
    inp = local_inputs(p, 1, 0)
    with forbid_host_syncs(), pytest.raises(HostSync):
        cpattn.dcp_decode_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"],
                                    group=None, interleave=2)
    q, k, v, cu = pcp_ranks.make_batch(1, [9, 4], 4, 2, 16, 16, torch.float32)
    with forbid_host_syncs(), pytest.raises(HostSync):
        cpattn.pcp_ring_prefill(q, k, v, cu, group=None)


def test_dcp_plan_empty_step_and_errors_world_one():
    """A step with no request: every padded row is the empty state. run() before plan(), a q with
    fewer rows than planned, or more than max_num_tokens: clear errors."""
    plan = cpattn.DcpDecodePlan(None, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, max_num_seqs=3,
                                max_num_tokens=4, max_blocks_per_seq=2, dtype=torch.float32, device="cpu")
    kc, vc = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
    with pytest.raises(RuntimeError, match="call plan"):
        plan.run(torch.randn(2, 4, 8), kc, vc)
    plan.plan(torch.zeros(0, dtype=torch.int32), torch.zeros(0, 2, dtype=torch.int32))
    out, lse = plan.run(torch.randn(3, 4, 8), kc, vc, return_lse=True)
    assert torch.equal(out, torch.zeros(3, 4, 8)) and torch.isneginf(lse).all()
    plan.plan(torch.tensor([5, 7]), torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="q has 1 rows but the plan has 2"):
        plan.run(torch.randn(1, 4, 8), kc, vc)
    with pytest.raises(ValueError, match="max_num_tokens"):
        plan.run(torch.randn(5, 4, 8), kc, vc)
    with pytest.raises(ValueError, match="q is on meta; the plan's buffers are on cpu"):
        plan.run(torch.randn(2, 4, 8, device="meta"), kc, vc)
    with pytest.raises(ValueError, match="max_num_seqs"):
        plan.plan(torch.tensor([5, 7, 1, 1]), torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table has room for 8"):
        plan.plan(torch.tensor([5, 9]), torch.tensor([[0, 1], [2, 3]]))
    out = torch.empty(2, 4, 8)
    assert plan.run(torch.randn(2, 4, 8), kc, vc, out=out) is out  # the failed plan() kept the previous step
