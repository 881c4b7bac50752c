"""The ``ascendc`` backend on a real Ascend NPU, against the float64 oracle on the CPU.

Skipped (without importing torch_npu) wherever torch_npu is not installed, as on every machine
this project has had: nothing in this file has run yet. On a machine with CANN, an NPU and the
extension built (docs/ascendc.md, "Building and testing on a machine with CANN and an NPU") it
checks each kernel through the backend and the public ops, with the same cases and tolerance
rule as the emulation tests (tests/test_ascendc_attention.py). ``CPATTN_REQUIRE_ASCENDC=1``
turns every skip into a failure, so a broken build cannot pass as "skipped".
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn
from cpattn import reference
from conftest import examples
from tolerance import assert_attention_close, assert_close


def _why_not() -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed"
    import torch_npu  # noqa: F401  (only here: it replaces torch's device handling)

    if not torch.npu.is_available():  # type: ignore[attr-defined]
        return "no NPU visible"
    from cpattn.backends.ascendc import _ext

    return _ext.unavailable()


_WHY = _why_not()
if _WHY and os.environ.get("CPATTN_REQUIRE_ASCENDC") == "1":
    raise RuntimeError(f"CPATTN_REQUIRE_ASCENDC=1 but the ascendc backend cannot run: {_WHY}")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"ascendc on NPU: {_WHY}")

DEV = "npu"
DT = [torch.float32, torch.float16, torch.bfloat16]
INF, NAN = float("inf"), float("nan")


def _npu(x):
    return None if x is None else x.to(DEV)


@settings(max_examples=examples(25, 500), deadline=None)
@given(n=st.sampled_from([1, 2, 3, 8, 64, 65]), rows=st.sampled_from([1, 7, 130]), d=st.sampled_from([1, 13, 128, 576]),
       dtype=st.sampled_from(DT), poison=st.booleans(), in_place=st.booleans(), seed=st.integers(0, 2**20))
def test_npu_merge_matches_reference(n, rows, d, dtype, poison, in_place, seed):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(n, rows, d, generator=g).to(dtype)
    lses = torch.randn(n, rows, generator=g) * 5
    if poison:  # empty rows of every kind (-inf, +inf, NaN LSE) with NaN under them
        m = torch.rand(n, rows, generator=g) < 0.35
        kinds = torch.tensor([-INF, INF, NAN])[torch.randint(0, 3, (n, rows), generator=g)]
        lses = torch.where(m, kinds, lses)
        outs = outs.masked_fill(m[..., None], NAN)
    ref = reference.merge_n(list(outs), list(lses))
    base = reference.merge_n(list(outs), list(lses), dtype=dtype)
    o, l = [x.to(DEV) for x in outs], [x.to(DEV) for x in lses]
    if in_place:  # the ring's accumulation: out is input 0
        got = cpattn.merge_attn_states_n(o, l, out=o[0], out_lse=l[0].clone(), backend="ascendc")
        assert got[0].data_ptr() == o[0].data_ptr()
    else:
        got = cpattn.merge_attn_states_n(o, l, backend="ascendc")
    assert_close(got[0].cpu(), ref[0], base[0], dtype=dtype)
    assert_close(got[1].cpu(), ref[1], base[1], dtype=torch.float32, what="lse")


def _check(out, lse, q, k, v, kw, dtype):
    """The rule of the emulated kernels' tests (tests/test_ascendc_attention.py, _RULE)."""
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and lse.dtype == torch.float32
    ro, rl = assert_attention_close(out, lse, q, k, v, dtype=dtype, **kw)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)), "exactly the rows that see no key are -inf"
    assert bool((out[torch.isneginf(lse)] == 0).all())


def _paged_case():
    from test_ascendc_attention import DT as NAMES, paged_cases, paged_inputs

    return NAMES, paged_cases, paged_inputs


@settings(max_examples=examples(25, 500), deadline=None)
@given(data=st.data())
def test_npu_paged_decode_matches_oracle(data):
    names, paged_cases, paged_inputs = _paged_case()
    c = data.draw(paged_cases())
    kw, kk, vv, okw = paged_inputs(c)
    dt = names[c["dtype"]]
    nkw = {k: (_npu(v) if isinstance(v, torch.Tensor) or v is None else v) for k, v in kw.items()}
    from cpattn.backends import get_backend

    be = get_backend("ascendc")
    assert be.reasons("paged_attention", nkw) == []
    out, lse = be.run("paged_attention", **nkw)
    _check(out, lse, kw["q"], kk, vv, okw, dt)


@settings(max_examples=examples(25, 500), deadline=None)
@given(data=st.data())
def test_npu_varlen_prefill_matches_oracle(data):
    from test_ascendc_attention import DT as NAMES, varlen_cases, varlen_inputs

    c = data.draw(varlen_cases())
    q, k, v, kw = varlen_inputs(c)
    dt = NAMES[c["dtype"]]
    kv = torch.cat([k, v], -1).to(DEV)  # K/V as views of one packed NPU buffer, as the ring holds them
    nkw = {key: (_npu(x) if isinstance(x, torch.Tensor) else x) for key, x in kw.items()}
    from cpattn.backends import get_backend

    be = get_backend("ascendc")
    inputs = dict(q=q.to(DEV), k=kv[..., : k.shape[-1]], v=kv[..., k.shape[-1]:], **nkw)
    assert be.reasons("attention", inputs) == []
    out, lse = be.run("attention", **inputs)
    _check(out, lse, q, k, v, kw, dt)


def test_npu_public_ops_choose_ascendc_and_match_the_oracle():
    """Automatic choice on NPU tensors picks ascendc; the single-rank DCP and PCP ops run on it."""
    from cpattn.backends import select

    g = torch.Generator().manual_seed(3)
    o, l = torch.randn(2, 5, 4, 64, generator=g).to(torch.bfloat16), torch.randn(2, 5, 4, generator=g)
    inputs = {"outs": [o[0].to(DEV), o[1].to(DEV)], "lses": [l[0].to(DEV), l[1].to(DEV)],
              "out": o[0].to(DEV), "out_lse": l[0].to(DEV)}
    assert select("merge", None, inputs).name == "ascendc"
    cu = torch.tensor([0, 37, 90])
    q, k, v = (torch.randn(90, h, 64, generator=g).to(torch.bfloat16) for h in (8, 2, 2))
    out, lse = cpattn.pcp_ring_prefill(q.to(DEV), k.to(DEV), v.to(DEV), cu, group=None, return_lse=True,
                                       backend="ascendc")
    ro, rl = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    bo, bl = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, dtype=torch.bfloat16)
    assert_close(out.cpu(), ro, bo.to(torch.bfloat16), dtype=torch.bfloat16)
    assert_close(lse.cpu(), rl, bl, dtype=torch.float32, what="lse")


def test_npu_merge_widens_16bit_partials_into_a_float32_out():
    """PCP's ring accumulator step: a float32 accumulator merged with a bfloat16 partial."""
    from cpattn.backends import get_backend

    g = torch.Generator().manual_seed(5)
    acc, part = torch.randn(9, 4, 40, generator=g), torch.randn(9, 4, 40, generator=g).to(torch.bfloat16)
    la, lp = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    ref = reference.merge_n([acc, part], [la, lp])
    base = reference.merge_n([acc, part.float()], [la, lp], dtype=torch.float32)
    out, lse = acc.to(DEV), la.to(DEV)
    inputs = {"outs": [out, part.to(DEV)], "lses": [lse, lp.to(DEV)], "out": out, "out_lse": lse}
    be = get_backend("ascendc")
    assert be.reasons("merge", inputs) == []
    be.run("merge", **inputs)  # in place on the accumulator, as the ring does
    assert_close(out.cpu(), ref[0], base[0], dtype=torch.float32)
    assert_close(lse.cpu(), ref[1], base[1], dtype=torch.float32, what="lse")
