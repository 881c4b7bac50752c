"""pcp_ring_prefill on real gloo ranks (world 1 to 4) against the float64 oracle over the whole batch."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn
import pcp_ranks
from cpattn import reference
from conftest import examples
from tolerance import assert_close, max_err

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def oracle(seed, lens, hq, hkv, dqk, dv, dtype, causal, scale=None):
    q, k, v, cu = pcp_ranks.make_batch(seed, lens, hq, hkv, dqk, dv, dtype)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal, scale=scale)
    ro, rl = reference.attention(q, k, v, **kw)
    bo, bl = reference.attention(q, k, v, **kw, dtype=dtype)
    return ro, rl, bo.to(dtype), bl


def check_rows(results, ref, dtype, what):
    """Each rank's rows against the oracle's rows at that rank's ``index``; every token once."""
    ro, rl, bo, bl = ref
    seen = torch.cat([i for i, _, _ in results]) if results else torch.zeros(0, dtype=torch.int64)
    assert sorted(seen.tolist()) == list(range(ro.shape[0])), "ranks must cover every token exactly once"
    for rank, (i, out, lse) in enumerate(results):
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_close(out, ro[i], bo[i], dtype=dtype, what=f"{what} rank {rank} out")
        assert_close(lse, rl[i], bl[i], dtype=torch.float32, what=f"{what} rank {rank} lse")


@st.composite
def batches(draw):
    n = draw(st.integers(1, 4))
    # lengths 1..300 (1 on purpose, and rarely 0), mostly not divisible by 2N
    lens = draw(st.lists(st.one_of(st.integers(1, 300), st.just(1), st.just(0)), min_size=1, max_size=5))
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 4]))
    dqk, dv = draw(st.sampled_from([(16, 16), (24, 16), (16, 32)]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    causal = draw(st.booleans())
    return n, lens, hkv * g, hkv, dqk, dv, dtype, causal, draw(st.integers(0, 10_000))


@settings(max_examples=examples(24, 300))
@given(case=batches())
def test_matches_oracle_both_methods(gloo, case):
    n, lens, hq, hkv, dqk, dv, dname, causal, seed = case
    dtype = DTYPES[dname]
    world = gloo(n)
    ref = oracle(seed, lens, hq, hkv, dqk, dv, dtype, causal)
    outs = {}
    for method in ("ring", "allgather"):
        res = world.run(pcp_ranks.prefill, seed, lens, hq, hkv, dqk, dv, dtype, causal, method)
        check_rows(res, ref, dtype, method)
        outs[method] = res
    # the two methods agree with each other as closely as either agrees with the oracle
    for (i, a, la), (_, b, lb) in zip(outs["ring"], outs["allgather"]):
        assert_close(a, b.double(), ref[2][i], dtype=dtype, factor=4.0, what="ring vs allgather")


@pytest.mark.parametrize("n", [2, 3, 4])
def test_long_single_sequence_and_explicit_scale(gloo, n):
    lens = [16 * 2 * n + 7]
    ref = oracle(5, lens, 4, 1, 16, 16, torch.float32, True, scale=0.3)
    for method in ("ring", "allgather"):
        res = gloo(n).run(pcp_ranks.prefill, 5, lens, 4, 1, 16, 16, torch.float32, True, method, scale=0.3)
        check_rows(res, ref, torch.float32, method)


def test_ring_sends_kv_at_its_own_head_count(gloo):
    """GQA KV is never repeated on the wire: N-1 blocks of [Tmax, Hkv, Dqk + Dv] per rank."""
    n, lens, hq, hkv, dqk, dv = 3, [100, 7], 8, 2, 16, 24
    sent = gloo(n).run(pcp_ranks.ring_bytes, 1, lens, hq, hkv, dqk, dv, torch.bfloat16)
    tmax = max(cpattn.pcp_partition(torch.tensor([0, 100, 107]), n, r).num_tokens for r in range(n))
    assert sent == [(n - 1) * tmax * hkv * (dqk + dv) * 2] * n


def test_reference_backend_and_mla_dims(gloo):
    lens = [50, 1, 13]
    ref = oracle(9, lens, 4, 1, 24, 16, torch.float32, True)
    res = gloo(3).run(pcp_ranks.prefill, 9, lens, 4, 1, 24, 16, torch.float32, True, "ring", backend="reference")
    check_rows(res, ref, torch.float32, "reference backend")


def test_explicit_subgroup(gloo):
    """A group other than the default one: passed to the op, resolved by name in the custom op."""
    lens = [40, 9]
    q, k, v, cu = pcp_ranks.make_batch(11, lens, 4, 2, 16, 16, torch.float32)
    ro, _ = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    bo, _ = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, dtype=torch.float32)
    for method in ("ring", "allgather"):
        res = gloo(4).run(pcp_ranks.prefill_subgroup, 11, lens, True, method)
        assert res[0] is None and res[2] is None
        for i, out in (res[1], res[3]):
            assert_close(out, ro[i], bo[i], dtype=torch.float32)


def test_empty_batch(gloo):
    res = gloo(2).run(pcp_ranks.prefill, 0, [0, 0], 4, 2, 16, 16, torch.float32, True, "ring")
    assert all(out.shape == (0, 4, 16) and lse.shape == (0, 4) for _, out, lse in res)


BAD = {
    # kind: (error on the spoiled rank(s), words its message must contain)
    "cu_differs": ("ValueError|CollectiveInputError", "cu_seqlens|holds"),
    "cu_vs_rows": ("ValueError", "holds .* tokens"),
    "wrong_world": ("ValueError", "group's size"),
    "dtype": ("TypeError", "dtype"),
    "dtype_across": ("CollectiveInputError", "dtype"),
    "heads": ("ValueError", "Hq"),
    "heads_across": ("CollectiveInputError", "heads"),
    "not_tensor": ("TypeError", "q must be a torch.Tensor"),
    "method": ("ValueError", "method"),
    "kv_rows": ("ValueError", "same .* tokens"),
    "device": ("ValueError", "device"),
}


@pytest.mark.parametrize("method", ["ring", "allgather"])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_raises_on_every_rank(gloo, kind, method):
    """Every rank raises (no hang): the spoiled rank its own error, the others CollectiveInputError."""
    import re

    n = 3 if kind != "wrong_world" else 2
    outcomes = gloo(n).run_outcomes(pcp_ranks.bad_input, kind, method, timeout=60)
    assert not any(o.ok for o in outcomes), [o.value for o in outcomes]
    types, words = BAD[kind]
    for r, o in enumerate(outcomes):
        assert re.fullmatch(types + "|CollectiveInputError", o.error_type), (r, o.error_type, o.message)
        assert re.search(words, o.message), (r, o.message)
        assert "pcp_ring_prefill" in o.message
    # the world is still usable afterwards: every rank left the failed call in step
    lens = [33]
    res = gloo(n).run(pcp_ranks.prefill, 2, lens, 2, 1, 16, 16, torch.float32, True, method)
    check_rows(res, oracle(2, lens, 2, 1, 16, 16, torch.float32, True), torch.float32, "after error")


def test_world_one_without_distributed_and_local_type_errors():
    """Not initialised: world size 1, no collective at all; bad input raises here, naming the argument."""
    q, k, v, cu = pcp_ranks.make_batch(4, [20, 3], 4, 2, 16, 8, torch.float32)
    out, lse = cpattn.pcp_ring_prefill(q, k, v, cu, group=None, return_lse=True)
    ro, rl = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    assert max_err(out, ro) < 1e-5 and max_err(lse, rl) < 1e-5
    out2 = cpattn.pcp_ring_prefill(q, k, v, cu.tolist(), group=None, method="allgather")
    assert torch.equal(out, out2)
    with pytest.raises(TypeError, match="group"):
        cpattn.pcp_ring_prefill(q, k, v, cu, group="world")
    with pytest.raises(TypeError, match="causal"):
        cpattn.pcp_ring_prefill(q, k, v, cu, group=None, causal=1)
    with pytest.raises(ValueError, match="scale"):
        cpattn.pcp_ring_prefill(q, k, v, cu, group=None, scale=float("nan"))
    with pytest.raises(ValueError, match="Dqk"):
        cpattn.pcp_ring_prefill(q, k[..., :8], v, cu, group=None)
    with pytest.raises(ValueError, match="unknown backend"):
        cpattn.pcp_ring_prefill(q, k, v, cu, group=None, backend="pytorch-nope")


def test_opcheck_world_one():
    q, k, v, cu = pcp_ranks.make_batch(6, [9, 4], 4, 2, 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.cpattn.pcp_ring_prefill, (q, k, v, cu, "", True, None, "ring", None))
    torch.library.opcheck(torch.ops.cpattn.pcp_ring_prefill, (q, k, v, cu, "", False, 0.5, "allgather", None))


@st.composite
def context_batches(draw):
    n = draw(st.integers(1, 4))
    b = draw(st.integers(1, 4))
    lens = draw(st.lists(st.one_of(st.integers(1, 120), st.just(1)), min_size=b, max_size=b))
    # 0 (no cache), short, or a long context with only a few new tokens
    ctx = draw(st.lists(st.one_of(st.just(0), st.integers(1, 60), st.integers(200, 400)), min_size=b, max_size=b))
    bs, il = draw(st.sampled_from([(4, 1), (8, 2), (8, 8), (16, 1)]))
    mla = draw(st.booleans())
    hkv, g = (1, 4) if mla else (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    dqk, dv = (24, 16) if mla else draw(st.sampled_from([(16, 16), (16, 24)]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    return n, lens, ctx, hkv * g, hkv, dqk, dv, dtype, draw(st.booleans()), bs, il, mla, draw(st.integers(0, 9999))


@settings(max_examples=examples(16, 200))
@given(case=context_batches())
def test_cached_context_matches_oracle(gloo, case):
    """Prompt tokens also see every cached token of their request (DCP layout over the same group)."""
    n, lens, ctx, hq, hkv, dqk, dv, dname, causal, bs, il, mla, seed = case
    dtype = DTYPES[dname]
    q, kf, vf, cuq, cuk = pcp_ranks.context_oracle_inputs(seed, lens, ctx, hq, hkv, dqk, dv, dtype, mla)
    kw = dict(cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=causal)  # bottom-right: prompt after its context
    ro, rl = reference.attention(q, kf, vf, **kw)
    bo, bl = reference.attention(q, kf, vf, **kw, dtype=dtype)
    for method in ("ring", "allgather"):
        res = gloo(n).run(pcp_ranks.prefill_with_context, seed, lens, ctx, hq, hkv, dqk, dv, dtype, causal,
                          method, bs, il, mla)
        check_rows(res, (ro, rl, bo.to(dtype), bl), dtype, f"{method} with context")


@pytest.mark.parametrize("kind", ["ctx_lens_differ", "cache_dtype", "cache_heads", "table_rows", "interleave"])
def test_bad_context_raises_on_every_rank(gloo, kind):
    outcomes = gloo(3).run_outcomes(pcp_ranks.bad_context, kind, timeout=60)
    assert not any(o.ok for o in outcomes), [o.value for o in outcomes]
    words = {"ctx_lens_differ": "context_lens", "cache_dtype": "k_cache", "cache_heads": "k_cache",
             "table_rows": "block_table", "interleave": "interleave"}[kind]
    for o in outcomes:
        assert o.error_type in ("ValueError", "TypeError", "CollectiveInputError"), o
        assert words in o.message, o.message


def test_context_type_errors_world_one():
    q, k, v, cu = pcp_ranks.make_batch(4, [6], 2, 1, 16, 16, torch.float32)
    with pytest.raises(TypeError, match="context"):
        cpattn.pcp_ring_prefill(q, k, v, cu, group=None, context=(1, 2))
    ctx = cpattn.PcpContext(torch.zeros(2, 4, 1, 16), None, torch.zeros(1, 2, dtype=torch.int32),
                            torch.tensor([3]), 0)
    with pytest.raises(ValueError, match="interleave"):
        cpattn.pcp_ring_prefill(q, k, v, cu, group=None, context=ctx)


def test_opcheck_with_context_world_one():
    from cpattn import layout

    q, k, v, cu, kc, vc = pcp_ranks.make_context_batch(8, [5, 3], [6, 0], 4, 2, 16, 16, torch.float32)
    sh = layout.shard_kv(kc, vc, torch.tensor([6, 0]), world_size=1, block_size=4)[0]
    args = (q, k, v, cu, "", True, None, "ring", None, sh.k_cache, sh.v_cache, sh.block_table,
            torch.tensor([6, 0]), 1)
    torch.library.opcheck(torch.ops.cpattn.pcp_ring_prefill, args)
