"""Properties of merge_attn_states / merge_attn_states_n on every backend.

Oracle: float64 attention over all keys (cpattn.reference). Tolerances: 2x the error of the same
merge written in plain PyTorch at the input precision (tests/tolerance.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import cpattn
from cpattn import reference
from conftest import examples
from tolerance import assert_close

BACKENDS = ["pytorch", "reference", "ascendc_emu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF, NAN = float("inf"), float("nan")


@st.composite
def split_problems(draw, max_ways=5):
    """Attention problem whose keys are cut into N contiguous parts (some may be empty)."""
    T = draw(st.integers(0, 6))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    d = draw(st.integers(1, 16))
    dv = draw(st.integers(1, 16))
    tk = draw(st.integers(0, 24))
    n = draw(st.integers(1, max_ways))
    cuts = sorted(draw(st.lists(st.integers(0, tk), min_size=n - 1, max_size=n - 1)))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(T=T, hq=hq, hkv=hkv, d=d, dv=dv, tk=tk, bounds=[0, *cuts, tk], causal=causal, dtype=dtype, seed=seed)


def make_partials(p, score_scale=1.0):
    """Partials (out in p['dtype'], lse float32) and the float64 whole-attention oracle."""
    g = torch.Generator().manual_seed(p["seed"])
    q = torch.randn(p["T"], p["hq"], p["d"], generator=g, dtype=torch.float64) * score_scale
    k = torch.randn(p["tk"], p["hkv"], p["d"], generator=g, dtype=torch.float64)
    v = torch.randn(p["tk"], p["hkv"], p["dv"], generator=g, dtype=torch.float64)
    qpos = torch.arange(p["T"]) + max(p["tk"] - p["T"], 0)
    kpos = torch.arange(p["tk"])
    whole = reference.attention(q, k, v, causal=p["causal"], q_positions=qpos, k_positions=kpos)
    outs, lses = [], []
    for a, b in zip(p["bounds"], p["bounds"][1:]):
        o, l = reference.attention(q, k[a:b], v[a:b], causal=p["causal"], q_positions=qpos, k_positions=kpos[a:b])
        outs.append(o.to(p["dtype"]))
        lses.append(l.float())
    return outs, lses, whole


def baseline_n(outs, lses, dtype):
    """The same N-way merge in plain PyTorch at the input precision."""
    return reference.merge_n(outs, lses, dtype=dtype)


def check(got, whole, base, dtype):
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_close(got[0], whole[0], base[0], dtype=dtype, what="out")
    assert_close(got[1], whole[1], base[1], dtype=torch.float32, what="lse")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(40, 2000))
@given(p=split_problems())
def test_split_then_merge_equals_whole(backend, p):
    outs, lses, whole = make_partials(p)
    base = baseline_n(outs, lses, p["dtype"])
    got = cpattn.merge_attn_states_n(torch.stack(outs), torch.stack(lses), backend=backend)
    check(got, whole, base, p["dtype"])
    # the list form gives the same bits as the stacked form
    got_list = cpattn.merge_attn_states_n(outs, lses, backend=backend)
    assert torch.equal(got_list[0], got[0]) and torch.equal(got_list[1], got[1])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(30, 2000))
@given(p=split_problems(max_ways=2), data=st.data())
def test_two_way_and_order(backend, p, data):
    outs, lses, whole = make_partials(p)
    if len(outs) == 1:
        outs.append(torch.zeros_like(outs[0]))
        lses.append(torch.full_like(lses[0], -INF))
    base = baseline_n(outs, lses, p["dtype"])
    ab = cpattn.merge_attn_states(outs[0], lses[0], outs[1], lses[1], backend=backend)
    ba = cpattn.merge_attn_states(outs[1], lses[1], outs[0], lses[0], backend=backend)
    check(ab, whole, base, p["dtype"])
    check(ba, whole, base, p["dtype"])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(30, 2000))
@given(p=split_problems(max_ways=5), data=st.data())
def test_permutation_invariance(backend, p, data):
    outs, lses, whole = make_partials(p)
    perm = data.draw(st.permutations(range(len(outs))))
    base = baseline_n(outs, lses, p["dtype"])
    got = cpattn.merge_attn_states_n([outs[i] for i in perm], [lses[i] for i in perm], backend=backend)
    check(got, whole, base, p["dtype"])


def _chain(outs, lses, merge2):
    o, l = outs[0], lses[0]
    for o2, l2 in zip(outs[1:], lses[1:]):
        o, l = merge2(o, l, o2, l2)
    return o, l


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(30, 2000))
@given(p=split_problems(max_ways=5))
def test_n_way_equals_chained_two_way_and_associativity(backend, p):
    outs, lses, whole = make_partials(p)
    dt = p["dtype"]

    def plain2(a, la, b, lb):  # plain PyTorch chained at the same precision, rounded between steps
        o, l = reference.merge(a, la, b, lb, dtype=dt)
        return o.to(dt), l.float()

    left = _chain(outs, lses, lambda *x: cpattn.merge_attn_states(*x, backend=backend))
    right = _chain(outs[::-1], lses[::-1], lambda *x: cpattn.merge_attn_states(*x, backend=backend))
    nway = cpattn.merge_attn_states_n(outs, lses, backend=backend)
    check(left, whole, _chain(outs, lses, plain2), dt)
    check(right, whole, _chain(outs[::-1], lses[::-1], plain2), dt)
    check(nway, whole, baseline_n(outs, lses, dt), dt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_state_is_exact_identity(backend, dtype):
    torch.manual_seed(1)
    x, lx = torch.randn(7, 3, 5).to(dtype), torch.randn(7, 3) * 10
    e, le = cpattn.lse.empty_state((7, 3), 5, dtype=dtype)
    for got in (cpattn.merge_attn_states(x, lx, e, le, backend=backend),
                cpattn.merge_attn_states(e, le, x, lx, backend=backend),
                cpattn.merge_attn_states_n([e, x, e], [le, lx, le], backend=backend)):
        assert torch.equal(got[0], x) and torch.equal(got[1], lx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [0.0, NAN, INF, 123.0])
def test_two_empties_give_empty_not_nan(backend, fill):
    o = torch.full((4, 2, 3), fill)
    for bad in (-INF, INF, NAN):
        l = torch.full((4, 2), bad)
        out, lse = cpattn.merge_attn_states(o, l, o.clone(), torch.full((4, 2), -INF), backend=backend)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(20, 1000))
@given(p=split_problems(max_ways=4), data=st.data())
def test_inf_and_nan_lse_inputs_are_empty(backend, dtype, p, data):
    p = {**p, "dtype": dtype}
    outs, lses, _ = make_partials(p)
    assume(outs[0].numel() > 0)
    # poison random rows of random inputs: LSE +inf or NaN, out rows NaN/inf garbage
    poisoned_o, poisoned_l, clean_o, clean_l = [], [], [], []
    for o, l in zip(outs, lses):
        mask = torch.rand(l.shape, generator=torch.Generator().manual_seed(p["seed"] + len(clean_o))) < 0.4
        bad_l = l.masked_fill(mask, data.draw(st.sampled_from([INF, NAN])))
        bad_o = o.masked_fill(mask[..., None], data.draw(st.sampled_from([NAN, INF, -INF, 7.0])))
        poisoned_o.append(bad_o)
        poisoned_l.append(bad_l)
        clean_o.append(o.masked_fill(mask[..., None], 0.0))
        clean_l.append(l.masked_fill(mask, -INF))
    got = cpattn.merge_attn_states_n(poisoned_o, poisoned_l, backend=backend)
    exp = cpattn.merge_attn_states_n(clean_o, clean_l, backend=backend)
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(20, 1000))
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 6))
def test_large_lse_spread_does_not_overflow(backend, dtype, seed, n):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(5, 3, 8, generator=g).to(dtype) for _ in range(n)]
    lses = [(torch.rand(5, 3, generator=g) * 2 - 1) * 1e4 for _ in range(n)]
    lses[0][0, 0] = 1e4
    lses[1][0, 0] = 1e4 - 0.5  # two close values at the top of the range: both count
    out, lse = cpattn.merge_attn_states_n(outs, lses, backend=backend)
    ref = reference.merge_n(outs, lses)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, ref[0], reference.merge_n(outs, lses, dtype=dtype)[0], dtype=dtype)
    torch.testing.assert_close(lse.double(), ref[1], rtol=2e-7, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_merge_matches_out_of_place(backend):
    torch.manual_seed(2)
    a, la, b, lb = torch.randn(9, 4, 16), torch.randn(9, 4), torch.randn(9, 4, 16), torch.randn(9, 4)
    exp = cpattn.merge_attn_states(a, la, b, lb, backend=backend)
    a2, la2 = a.clone(), la.clone()
    got = cpattn.merge_attn_states(a2, la2, b, lb, out=a2, out_lse=la2, backend=backend)
    assert got[0] is a2 and got[1] is la2
    assert torch.equal(a2, exp[0]) and torch.equal(la2, exp[1])
    stack, lstack = torch.stack([a, b]), torch.stack([la, lb])
    got_n = cpattn.merge_attn_states_n(stack, lstack, out=stack[1], out_lse=lstack[1], backend=backend)
    assert torch.equal(stack[1], exp[0]) and torch.equal(lstack[1], exp[1]) and got_n[0].data_ptr() == stack[1].data_ptr()


def test_non_contiguous_inputs_and_out():
    torch.manual_seed(3)
    a = torch.randn(4, 6, 8).transpose(0, 1)  # [6, 4, 8] non-contiguous
    b = torch.randn(6, 4, 8)
    la, lb = torch.randn(4, 6).t(), torch.randn(6, 4)
    out = torch.empty(8, 6, 4).permute(1, 2, 0)  # non-contiguous output buffer
    cpattn.merge_attn_states(a, la, b, lb, out=out, backend="pytorch")
    ref = reference.merge(a, la, b, lb)
    torch.testing.assert_close(out.double(), ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 4, 8), (3, 0, 8), (3, 4, 0), (5, 8), (2, 3, 4, 8)])
def test_degenerate_and_other_ranks(shape):
    a, b = torch.randn(shape), torch.randn(shape)
    la, lb = torch.randn(shape[:-1]), torch.randn(shape[:-1])
    for backend in BACKENDS:
        out, lse = cpattn.merge_attn_states(a, la, b, lb, backend=backend)
        ref = reference.merge(a, la, b, lb)
        assert out.shape == shape and lse.shape == shape[:-1]
        torch.testing.assert_close(out.double(), ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse.double(), ref[1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ bad input


def _ok():
    return torch.randn(3, 2, 4), torch.randn(3, 2), torch.randn(3, 2, 4), torch.randn(3, 2)


@pytest.mark.parametrize(
    "mutate, exc, name",
    [
        (lambda a, la, b, lb: (a, la, b[:2], lb), ValueError, "out_b"),
        (lambda a, la, b, lb: (a, la, b.half(), lb), TypeError, "out_b"),
        (lambda a, la, b, lb: (a, la.double(), b, lb), TypeError, "lse_a"),
        (lambda a, la, b, lb: (a, la, b, lb.bfloat16()), TypeError, "lse_b"),
        (lambda a, la, b, lb: (a, la[:, :1], b, lb), ValueError, "lse_a"),
        (lambda a, la, b, lb: (a.int(), la, b.int(), lb), TypeError, "out_a"),
        (lambda a, la, b, lb: (a, la, b.to("meta"), lb), ValueError, "device"),
        (lambda a, la, b, lb: (a.numpy(), la, b, lb), TypeError, "out_a"),
    ],
)
def test_bad_input_raises_naming_argument_and_writes_nothing(mutate, exc, name):
    a, la, b, lb = mutate(*_ok())
    out = torch.full((3, 2, 4), 5.0)
    out_lse = torch.full((3, 2), 5.0)
    with pytest.raises(exc, match=name):
        cpattn.merge_attn_states(a, la, b, lb)
    with pytest.raises(exc, match=name):
        cpattn.merge_attn_states(a, la, b, lb, out=out, out_lse=out_lse)
    assert (out == 5).all() and (out_lse == 5).all()


def test_bad_out_buffers():
    a, la, b, lb = _ok()
    with pytest.raises(ValueError, match="out must have shape"):
        cpattn.merge_attn_states(a, la, b, lb, out=torch.empty(3, 2, 5))
    with pytest.raises(TypeError, match="out must have dtype"):
        cpattn.merge_attn_states(a, la, b, lb, out=torch.empty(3, 2, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="out_lse must have dtype"):
        cpattn.merge_attn_states(a, la, b, lb, out_lse=torch.empty(3, 2, dtype=torch.float64))
    keep = a.clone()
    with pytest.raises(ValueError, match="partially overlaps"):
        big = torch.randn(4, 2, 4)
        cpattn.merge_attn_states(big[:3], la, b, lb, out=big[1:])
    assert torch.equal(a, keep)


def test_n_way_bad_input():
    with pytest.raises(ValueError, match="N >= 1"):
        cpattn.merge_attn_states_n([], [])
    with pytest.raises(ValueError, match="N >= 1"):
        cpattn.merge_attn_states_n(torch.empty(0, 3, 4), torch.empty(0, 3))
    with pytest.raises(ValueError, match="same length"):
        cpattn.merge_attn_states_n([torch.zeros(2, 3)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match=r"lses\[1\]"):
        cpattn.merge_attn_states_n(torch.zeros(2, 3, 4), [torch.zeros(3), torch.zeros(4)])
    with pytest.raises(TypeError, match="outs"):
        cpattn.merge_attn_states_n("x", [torch.zeros(2)])


# ------------------------------------------------------------------ dispatch


def test_explicit_backend_never_falls_back(monkeypatch):
    from cpattn.backends import registry

    refusing = registry.Backend("pytorch", "refuses everything for this test")
    refusing.kernel("merge", check=lambda **kw: ["refuses for the test"])(lambda **kw: None)
    monkeypatch.setitem(registry._loaded, "pytorch", refusing)
    a, la, b, lb = _ok()
    with pytest.raises(cpattn.BackendError, match="refuses for the test"):
        cpattn.merge_attn_states(a, la, b, lb, backend="pytorch")
    monkeypatch.setenv("CPATTN_BACKEND", "pytorch")
    with pytest.raises(cpattn.BackendError, match="CPATTN_BACKEND"):
        cpattn.merge_attn_states(a, la, b, lb)
    monkeypatch.delenv("CPATTN_BACKEND")
    # automatic choice falls back to the next capable backend (the reference)
    got = cpattn.merge_attn_states(a, la, b, lb)
    torch.testing.assert_close(got[0].double(), reference.merge(a, la, b, lb)[0], rtol=1e-5, atol=1e-6)
    # and when none can run, every reason is listed
    monkeypatch.setitem(registry._loaded, "reference", "not importable: test")
    with pytest.raises(cpattn.BackendError, match=r"(?s)pytorch: refuses.*reference: not importable"):
        cpattn.merge_attn_states(a, la, b, lb)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        cpattn.merge_attn_states(*_ok(), backend="nope")


def test_env_backend_selects(monkeypatch):
    from cpattn.backends import registry

    calls = []
    real = registry.get_backend("reference")
    spy = registry.Backend("reference", "spy")
    spy.kernel("merge")(lambda **kw: (calls.append(1), real.run("merge", **kw)))
    monkeypatch.setitem(registry._loaded, "reference", spy)
    monkeypatch.setenv("CPATTN_BACKEND", "reference")
    cpattn.merge_attn_states(*_ok())
    assert calls == [1]


# ------------------------------------------------------------------ torch.library


def test_opcheck_all_merge_ops():
    a, la, b, lb = _ok()
    la[0, 0] = -INF
    ops = torch.ops.cpattn
    torch.library.opcheck(ops.merge_attn_states.default, (a, la, b, lb))
    torch.library.opcheck(ops.merge_attn_states_n.default, ([a, b, a], [la, lb, lb]))
    torch.library.opcheck(ops.merge_attn_states_out.default, (a, la, b, lb, torch.empty_like(a), torch.empty_like(la)))
    torch.library.opcheck(ops.merge_attn_states_n_out.default, ([a, b], [la, lb], torch.empty_like(a), torch.empty_like(la)))


def test_torch_compile_fullgraph():
    a, la, b, lb = _ok()
    exp = cpattn.merge_attn_states(a, la, b, lb)

    @torch.compile(fullgraph=True, backend="eager")
    def f(a, la, b, lb):
        o, l = cpattn.merge_attn_states(a, la, b, lb)
        o2, l2 = cpattn.merge_attn_states_n(torch.stack([o, b]), torch.stack([l, torch.full_like(l, -math.inf)]))
        return o2 * 1, l2

    got = f(a, la, b, lb)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


def test_torch_compile_inductor_fullgraph():
    a, la, b, lb = _ok()
    exp = cpattn.merge_attn_states(a, la, b, lb)
    got = torch.compile(cpattn.merge_attn_states, fullgraph=True)(a, la, b, lb)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


def test_output_buffer_overlapping_the_other_kind_of_input_is_refused():
    a, la, b, lb = _ok()
    flat = torch.randn(3 * 2 * 4)
    out_lse_inside_out_b = flat[:6].view(3, 2)
    with pytest.raises(ValueError, match="out_lse partially overlaps"):
        cpattn.merge_attn_states(a, la, flat.view(3, 2, 4), lb, out_lse=out_lse_inside_out_b)


# ------------------------------------------------------------------ output buffers that overlap (issue 11, item 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["lse_view_into_out", "out_view_into_lse_buffer", "stride0_out_lse", "stride0_out"])
def test_overlapping_output_buffers_are_refused_before_writing(backend, case):
    a, la, b, lb = _ok()
    if case == "lse_view_into_out":
        out = torch.full((3, 2, 4), 5.0)
        out_lse = out.view(-1)[:6].view(3, 2)  # out_lse inside out
    elif case == "out_view_into_lse_buffer":
        buf = torch.full((3 * 2 * 4 + 6,), 5.0)
        out, out_lse = buf[:24].view(3, 2, 4), buf[20:26].view(3, 2)  # byte ranges overlap at the end of out
    elif case == "stride0_out_lse":
        out, out_lse = torch.full((3, 2, 4), 5.0), torch.full((1,), 5.0).expand(3, 2)
    else:
        out, out_lse = torch.full((1, 2, 4), 5.0).expand(3, 2, 4), torch.full((3, 2), 5.0)
    keep_out, keep_lse = out.clone(), out_lse.clone()
    with pytest.raises(ValueError, match="share memory|shares memory"):
        cpattn.merge_attn_states(a, la, b, lb, out=out, out_lse=out_lse, backend=backend)
    with pytest.raises(ValueError, match="share memory|shares memory"):
        cpattn.merge_attn_states_n([a, b], [la, lb], out=out, out_lse=out_lse, backend=backend)
    assert torch.equal(out, keep_out) and torch.equal(out_lse, keep_lse), "nothing may be written"


def test_strided_but_distinct_output_buffers_are_accepted():
    a, la, b, lb = _ok()
    buf = torch.empty(3, 2, 5)  # out and out_lse in one buffer, side by side: no element shared ...
    out, out_lse = buf[..., :4], buf[..., 4]
    with pytest.raises(ValueError, match="shares memory"):  # ... but their byte ranges interleave: refused (documented)
        cpattn.merge_attn_states(a, la, b, lb, out=out, out_lse=out_lse)
    out = torch.empty(2, 3, 4).transpose(0, 1)  # a permuted dense buffer is fine
    got = cpattn.merge_attn_states(a, la, b, lb, out=out)
    exp = cpattn.merge_attn_states(a, la, b, lb)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


def test_meta_inputs_on_a_cpu_only_backend_are_a_clear_refusal():
    """ascendc_emu runs the AscendC kernels on CPU memory only: 'meta' inputs are refused with the
    backend's reason (never an overlap report, never a crash in the extension)."""
    a, la, b, lb = (x.to("meta") for x in _ok())
    with pytest.raises(cpattn.BackendError, match="not on 'meta' tensors"):
        cpattn.merge_attn_states(a, la, b, lb, backend="ascendc_emu")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "ascendc_emu"])
def test_meta_inputs_give_shape_only_result(backend):
    """Eager merges on 'meta' tensors (no storage) used to report an overlap: every meta tensor
    has data_ptr 0. They now return meta outputs of the right shapes and dtypes."""
    a, la, b, lb = (x.to("meta") for x in _ok())
    for out, lse in (cpattn.merge_attn_states(a, la, b, lb, backend=backend),
                     cpattn.merge_attn_states_n([a, b, a], [la, lb, la], backend=backend),
                     cpattn.merge_attn_states(a.bfloat16(), la, b.bfloat16(), lb, backend=backend)):
        assert out.device.type == "meta" and lse.device.type == "meta"
        assert out.shape == (3, 2, 4) and lse.shape == (3, 2) and lse.dtype == torch.float32
    out, out_lse = torch.empty(3, 2, 4, device="meta"), torch.empty(3, 2, device="meta")
    got = cpattn.merge_attn_states(a, la, b, lb, out=out, out_lse=out_lse, backend=backend)
    assert got[0] is out and got[1] is out_lse


# ------------------------------------------------------------------ forward only (issue 11, item 13)


def test_inputs_requiring_grad_are_refused_with_a_clear_message():
    a, la, b, lb = _ok()
    for name, args in (("out_a", (a.requires_grad_(), la, b, lb)), ("lse_b", (a.detach(), la, b, lb.requires_grad_()))):
        with pytest.raises(ValueError, match=f"{name} requires grad.*forward-only"):
            cpattn.merge_attn_states(*args)
        with pytest.raises(ValueError, match="forward-only"):
            cpattn.merge_attn_states_n([args[0], args[2]], [args[1], args[3]])
        with torch.no_grad():  # allowed: no graph is being recorded
            cpattn.merge_attn_states(*args)
    a, la, b, lb = _ok()
    o, l = torch.ops.cpattn.merge_attn_states(a.requires_grad_(), la, b, lb, None)
    with pytest.raises(RuntimeError, match="no autograd formula"):  # the op: backward raises, never a silent zero
        o.sum().backward()
