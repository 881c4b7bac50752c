"""The AscendC merge_attn_states kernel (csrc/ascendc/kernels/merge_attn_states.cpp) run through
the emulation (backend ``ascendc_emu``), against the float64 merge of cpattn.reference with the
project's tolerance rule (tests/tolerance.py).

The general merge properties (split-then-merge equals whole attention, order, two-way chains,
empty identity, in-place) run on this backend too: tests/test_merge.py lists it in BACKENDS.
Here: what the kernel's tiling makes special (N up to 64 in chunks of 8, head dims that are not
32-byte rows, several tiles per core, any core count), poisoned empty inputs, aliasing, the
optional LSE output, and the UB the kernel really uses.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cpattn
from cpattn import reference
from cpattn.backends import registry
from conftest import examples
from tolerance import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF, NAN = float("inf"), float("nan")
HEAD_DIMS = [1, 3, 7, 8, 15, 16, 17, 33, 64, 65, 96, 127, 128, 129, 200, 512, 576]


@pytest.fixture(scope="module")
def ext():
    from cpattn.backends.ascendc_emu import _build

    return _build.load()


@st.composite
def problems(draw):
    rows_t = draw(st.sampled_from([0, 1, 2, 5, 17, 40, 130]))
    h = draw(st.integers(1, 3))
    d = draw(st.sampled_from(HEAD_DIMS))
    n = draw(st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 33, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    cores = draw(st.sampled_from([1, 2, 3, 8, 40, 48]))
    p_empty = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    poison = draw(st.sampled_from([-INF, INF, NAN]))
    spread = draw(st.sampled_from([1.0, 10.0, 80.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    # keep the emulated work small: rows * D * N elements
    if rows_t * h * d * n > 400_000:
        rows_t = max(1, 400_000 // (h * d * n))
    return dict(T=rows_t, H=h, D=d, N=n, dtype=dtype, cores=cores, p_empty=p_empty, poison=poison,
                spread=spread, seed=seed)


def make(p):
    """Partials with some rows empty (LSE -inf/+inf/NaN and garbage out rows), and the clean
    float64 oracle and plain same-precision baseline."""
    g = torch.Generator().manual_seed(p["seed"])
    shape = (p["T"], p["H"])
    outs, lses, clean_o, clean_l = [], [], [], []
    for _ in range(p["N"]):
        o = torch.randn(*shape, p["D"], generator=g).to(p["dtype"])
        l = torch.randn(*shape, generator=g) * p["spread"]
        empty = torch.rand(*shape, generator=g) < p["p_empty"]
        bad = l.masked_fill(empty, p["poison"])
        garbage = o.masked_fill(empty[..., None], NAN if p["poison"] != -INF else 0.0)
        outs.append(garbage)
        lses.append(bad)
        clean_o.append(o.masked_fill(empty[..., None], 0.0))
        clean_l.append(l.masked_fill(empty, -INF))
    whole = reference.merge_n(clean_o, clean_l)
    base = reference.merge_n(clean_o, clean_l, dtype=p["dtype"])
    return outs, lses, whole, base


def check(got_o, got_l, whole, base, dtype):
    assert got_o.dtype == dtype and got_l.dtype == torch.float32
    assert not torch.isnan(got_o).any() and not torch.isnan(got_l).any()
    assert_close(got_o, whole[0], base[0], dtype=dtype, what="out")
    assert_close(got_l, whole[1], base[1], dtype=torch.float32, what="lse")


@settings(max_examples=examples(40, 2000))
@given(p=problems())
def test_kernel_matches_reference(ext, p):
    outs, lses, whole, base = make(p)
    out = torch.empty_like(outs[0])
    out_lse = torch.empty(p["T"], p["H"])
    info = ext.merge_attn_states(outs, lses, out, out_lse, p["cores"])
    check(out, out_lse, whole, base, p["dtype"])
    rows = p["T"] * p["H"]
    if rows:
        assert info["used_cores"] <= p["cores"]
        assert info["ub_used"] == info["ub_bytes"] <= 192 * 1024 - 256 - 8 * 1024
        # all-empty rows: exactly (0, -inf)
        all_empty = torch.stack([~torch.isfinite(l) | (l == INF) for l in lses]).all(0)
        assert (out[all_empty] == 0).all() and torch.isneginf(out_lse[all_empty]).all()


@settings(max_examples=examples(20, 1000))
@given(p=problems(), in_place=st.booleans())
def test_public_op_and_aliasing(p, in_place):
    outs, lses, whole, base = make(p)
    if in_place:  # the ring's in-place accumulation: out is input 0, out_lse is lse 0
        o0, l0 = outs[0].clone(), lses[0].clone()
        outs[0], lses[0] = o0, l0
        got = cpattn.merge_attn_states_n(outs, lses, out=o0, out_lse=l0, backend="ascendc_emu")
        assert got[0] is o0 and got[1] is l0
    else:
        got = cpattn.merge_attn_states_n(torch.stack(outs), torch.stack(lses), backend="ascendc_emu")
    check(got[0], got[1], whole, base, p["dtype"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_lse_output_and_non_contiguous(ext, dtype):
    torch.manual_seed(4)
    outs = [torch.randn(9, 2, 33).to(dtype) for _ in range(5)]
    lses = [torch.randn(9, 2) for _ in range(5)]
    a, al = torch.empty_like(outs[0]), torch.empty(9, 2)
    ext.merge_attn_states(outs, lses, a, al, 4)
    b = torch.full_like(outs[0], 7.0)
    ext.merge_attn_states(outs, lses, b, None, 4)  # optional LSE output
    assert torch.equal(a, b)
    # non-contiguous inputs and output buffer
    nc = [o.transpose(0, 1).contiguous().transpose(0, 1) for o in outs]
    out = torch.empty(2, 9, 33, dtype=dtype).transpose(0, 1)
    cpattn.merge_attn_states_n(nc, lses, out=out, backend="ascendc_emu")
    assert torch.equal(out, a)


def test_many_tiles_per_core_and_many_inputs(ext):
    """One core, 300 rows of D=128 float32 with N=64: several tiles and 8 chunks of inputs."""
    p = dict(T=150, H=2, D=128, N=64, dtype=torch.float32, cores=1, p_empty=0.2, poison=NAN, spread=10.0, seed=5)
    outs, lses, whole, base = make(p)
    out, out_lse = torch.empty_like(outs[0]), torch.empty(150, 2)
    info = ext.merge_attn_states(outs, lses, out, out_lse, 1)
    assert info["used_cores"] == 1 and info["tile_rows"] < 300 and info["chunk_inputs"] == 8
    check(out, out_lse, whole, base, torch.float32)


@pytest.mark.parametrize("d", [1, 8, 64, 129, 576, 1000, 2032])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tiling_fits_the_unified_buffer(ext, d, dtype):
    assert ext.merge_attn_states_check(1000, 64, d, dtype, 40) == ""
    assert ext.merge_attn_states_check(1000, 2, d, dtype, 1) == ""


def test_refusals_are_reasons_not_crashes(ext):
    assert "2040" in ext.merge_attn_states_check(10, 2, 4096, "float32", 40)
    a, la = torch.randn(3, 2, 4096), torch.randn(3, 2)
    with pytest.raises(cpattn.BackendError, match="ascendc_emu.*2040"):
        cpattn.merge_attn_states(a, la, a.clone(), la.clone(), backend="ascendc_emu")
    d, ld = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2)
    with pytest.raises(cpattn.BackendError, match="float64"):
        cpattn.merge_attn_states(d, ld, d.clone(), ld.clone(), backend="ascendc_emu")


def test_never_chosen_automatically():
    a, la = torch.randn(3, 2, 8), torch.randn(3, 2)
    inputs = {"outs": [a, a], "lses": [la, la], "out": a.clone(), "out_lse": la.clone()}
    assert registry.select("merge", None, inputs).name != "ascendc_emu"
    emu = registry.get_backend("ascendc_emu")
    assert emu.reasons("merge", inputs, auto=True) == ["is never chosen automatically (request it explicitly)"]
    assert emu.reasons("merge", inputs) == []
    assert "ascendc_emu" in cpattn.list_backends()


def test_emulation_errors_are_python_exceptions(ext):
    assert issubclass(ext.EmulationError, RuntimeError)
    assert ext.KERNELS and "merge_attn_states" in ext.KERNELS


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_mixed_dtypes_and_strict_rule_around_the_kernel(ext, out_dtype):
    """The ring's merges: a float32 accumulator with a bfloat16 partial (merged in float32, rounded
    once into ``out``), and DCP/PCP's strict rule (a NaN/+inf input LSE makes the row NaN) applied
    around the one-dtype kernel; equal to the PyTorch kernel's strict merge."""
    from cpattn.backends import select


    g = torch.Generator().manual_seed(3)
    acc = torch.randn(5, 3, 24, generator=g)
    part = torch.randn(5, 3, 24, generator=g).to(torch.bfloat16)
    la, lp = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    la[1, 2], lp[3, 0], lp[4, 1] = float("nan"), float("inf"), float("-inf")
    res = {}
    for name in ("ascendc_emu", "pytorch"):
        out = torch.empty(5, 3, 24, dtype=out_dtype)
        lse = torch.empty(5, 3)
        inputs = dict(outs=[acc, part], lses=[la, lp], out=out, out_lse=lse)
        select("merge", name, inputs).run("merge", **inputs, nan_propagate=True)
        res[name] = (out.float(), lse)
    (o, l), (ro, rl) = res["ascendc_emu"], res["pytorch"]
    assert torch.isnan(l[1, 2]) and torch.isnan(l[3, 0]) and torch.isnan(o[1, 2]).all() and torch.isnan(o[3, 0]).all()
    assert torch.equal(torch.isnan(l), torch.isnan(rl)) and torch.equal(torch.isnan(o), torch.isnan(ro))
    fin = ~torch.isnan(rl)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(l[fin], rl[fin], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o[fin], ro[fin], atol=tol, rtol=tol)
