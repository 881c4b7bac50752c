"""The ``ascendc`` backend on a machine without CANN or an NPU: it is listed, never chosen for CPU
tensors, says why it cannot run, never imports torch_npu, and its ops have schemas and fake
implementations. (The kernels themselves are checked through the emulation, backend
``ascendc_emu``; the NPU binding by ``make check-ascendc-host``; see docs/ascendc.md.)"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import cpattn
from cpattn.backends import BackendError, get_backend, list_backends, select
from cpattn.backends import ascendc as A


def test_listed_first_and_npu_only():
    assert list_backends()[0] == "ascendc"
    b = get_backend("ascendc")
    assert b.device_types == ("npu",)
    assert set(b.kernels) == {"merge", "paged_attention", "attention"}


def test_explicit_request_on_cpu_lists_every_reason():
    o, l = torch.randn(3, 2, 8), torch.randn(3, 2)
    with pytest.raises(BackendError) as e:
        cpattn.merge_attn_states(o, l, o.clone(), l.clone(), backend="ascendc")
    assert "runs on npu, not on 'cpu' tensors" in str(e.value)
    # the kernel's own check (run for NPU tensors) also says the extension is missing here
    why = A._check_merge([o], [l], o, l)
    assert any("extension not built" in w and "ASCEND_HOME_PATH" in w for w in why)


def test_never_chosen_automatically_for_cpu():
    o, l = torch.randn(3, 2, 8), torch.randn(3, 2)
    inputs = {"outs": [o, o], "lses": [l, l], "out": o.clone(), "out_lse": l.clone()}
    assert select("merge", None, inputs).name != "ascendc"
    out, lse = cpattn.merge_attn_states(o, l, o, l)  # the automatic choice still works
    assert out.shape == o.shape


def test_kernel_limits_are_reasons():
    o64, l = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2)
    r = A._check_merge([o64], [l], o64, l)
    assert any("float64" in x for x in r)
    o = torch.randn(2, 3, 8).transpose(0, 1)  # not contiguous
    r = A._check_merge([o], [l], o, l)
    assert any("contiguous" in x for x in r)
    r = A._check_merge([o.contiguous()], [l.double()], o.contiguous(), l)
    assert any("float32" in x for x in r)
    acc = torch.randn(3, 2, 8)
    r = A._check_merge([acc, acc.to(torch.bfloat16)], [l, l], acc, l)  # PCP's ring accumulator step: widened
    assert not any("like out" in x for x in r)
    r = A._check_merge([acc, acc.to(torch.bfloat16)], [l, l], acc.to(torch.bfloat16), l)  # merged in float32
    assert not any("float32, float16 or bfloat16" in x for x in r)
    r = A._check_merge([acc, acc.double()], [l, l], acc, l)
    assert any("float32, float16 or bfloat16" in x for x in r)
    q = torch.randn(4, 2, 8, dtype=torch.float16)
    k = torch.randn(4, 2, 8, dtype=torch.float32)
    r = A._check_varlen(q, k, k, None, None)
    assert any("one dtype" in x for x in r)


def test_op_schemas_and_fake_shapes():
    ops = torch.ops.cpattn
    assert "Tensor(a!) out" in str(ops.ascendc_merge_attn_states.default._schema)
    for name in ("ascendc_merge_attn_states", "ascendc_paged_decode", "ascendc_varlen_prefill"):
        kernel, check = getattr(ops, name).default._schema, getattr(ops, name + "_check").default._schema
        assert [a.name for a in check.arguments] == [a.name for a in kernel.arguments]
        assert str(check.returns[0].type) == "str"
    q = torch.empty(5, 4, 24, device="meta", dtype=torch.bfloat16)
    kc = torch.empty(3, 16, 1, 24, device="meta", dtype=torch.bfloat16)
    idx = torch.empty(2, 3, device="meta", dtype=torch.int32)
    qsl = torch.empty(3, device="meta", dtype=torch.int32)
    vis = torch.empty(5, device="meta", dtype=torch.int32)
    out, lse = ops.ascendc_paged_decode(q, kc, None, idx, qsl, vis, 0.1, 16, 1, 48)
    assert out.shape == (5, 4, 16) and out.dtype == torch.bfloat16 and lse.shape == (5, 4) and lse.dtype == torch.float32
    k = torch.empty(7, 2, 24, device="meta", dtype=torch.bfloat16)
    v = torch.empty(7, 2, 12, device="meta", dtype=torch.bfloat16)
    cu = torch.empty(2, device="meta", dtype=torch.int32)
    out, lse = ops.ascendc_varlen_prefill(q, k, v, cu, cu, None, None, False, 0.2)
    assert out.shape == (5, 4, 12) and lse.shape == (5, 4)


def test_cpu_call_of_the_npu_op_fails_clearly():
    q = torch.randn(2, 2, 8)
    with pytest.raises(NotImplementedError, match="ascendc_varlen_prefill"):
        torch.ops.cpattn.ascendc_varlen_prefill(q, q, q, torch.tensor([0, 2]), torch.tensor([0, 2]), None, None,
                                                False, 0.3)


def _run(code: str, env: dict | None = None) -> str:
    import os

    e = dict(os.environ, **(env or {}))
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_torch_npu_is_never_imported():
    out = _run("""
        import sys, torch, cpattn
        from cpattn.backends import select, get_backend
        o, l = torch.randn(2, 2, 4), torch.randn(2, 2)
        cpattn.merge_attn_states(o, l, o, l)
        print(get_backend("ascendc").reasons("merge", dict(outs=[o], lses=[l], out=o, out_lse=l)))
        print("torch_npu" in sys.modules)
    """)
    assert out.splitlines()[-1] == "False"


def test_extension_reasons(tmp_path):
    # built but torch_npu not imported; then a file that is no library, with torch_npu "imported"
    bogus = tmp_path / "libcpattn_ascendc.so"
    bogus.write_text("not a shared library")
    out = _run("""
        import sys, types
        from cpattn.backends.ascendc import _ext
        print(_ext.unavailable())
        sys.modules["torch_npu"] = types.ModuleType("torch_npu")
        print(_ext.unavailable())
    """, {"CPATTN_ASCENDC_LIB": str(bogus)})
    first, second = out.splitlines()[-2:]
    assert "torch_npu is not imported" in first
    assert second.startswith("extension failed to load:")
