"""triton-ascend's compiler front end on every Triton kernel, without an NPU or CANN.

Runs only where the installed ``triton`` is triton-ascend (``make test-ascend-triton``; skipped
with the reason elsewhere). Each kernel is lowered for an Ascend910B3 target through
``make_ir -> ttir -> linalg`` (the wheel's ``triton-adapter-opt``; only the binary stage after
it needs CANN's bishengir compiler), with the block sizes the host wrappers choose for each
configuration: GQA, MLA 576/512 with 16 and 128 heads, head dims that are not powers of two,
and each dtype. A configuration fails on

* a lowering error (the interpreter accepts constructs the compiler rejects);
* a tile over the unified-buffer budget: the chooser's estimate of one iteration's live tiles
  above :data:`tiles.UB_BUDGET`, or any single tensor in the TTIR above half of it;
* a discrete access: triton-adapter-opt marks loads/stores it must split into per-element
  scalar accesses (``DiscreteMemAccess`` / ``ExtractedLoadOrStore``), the documented slow
  path, which the block-table gathers of an earlier paged kernel produced;
* an unbounded tile copy: a ``memref.copy`` of a statically shaped tile, which is what a load
  masked per row (rather than by a rectangle) lowers to, reading masked-out lanes past the end
  of a tensor (triton-ascend issue #2332: unmapped addresses fault the vector core).

What this does not show: that bishengir compiles the linalg, the real UB allocation, or speed.
"""
from __future__ import annotations

import hashlib
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton", reason="no triton module; this test needs triton-ascend: run make test-ascend-triton")
try:
    from triton.backends.ascend import compiler as _ascend  # noqa: F401
except Exception as exc:  # stock Triton: the lane that runs this is `make test-ascend-triton`
    pytest.skip(f"triton-ascend is not the installed triton ({type(exc).__name__}); run make test-ascend-triton",
                allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") == "1":  # kernels are interpreter objects then, not compilable
    pytest.skip("lowering needs compiled kernels: run with TRITON_INTERPRET=0 (make test-ascend-triton does)",
                allow_module_level=True)

from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
import triton.language as tl  # noqa: E402

from cpattn.backends.triton import merge, paged, tiles, varlen  # noqa: E402

TARGET = GPUTarget("npu", "Ascend910B3", 0)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TENSOR = re.compile(r"tensor<((?:\d+x)+)(f32|f16|bf16|i64|i32|i1|i8)>")
_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i1": 1, "i8": 1}


def lower(fn, signature: dict, constants: dict) -> tuple[str, str]:
    """``(ttir, linalg)`` text of ``fn`` for the NPU target; raises on a lowering error."""
    backend = make_backend(TARGET)
    options = backend.parse_options({})
    src = ASTSource(fn, signature, constants)
    metadata = {"hash": hashlib.sha256(src.hash().encode()).hexdigest(), "target": TARGET, **options.__dict__}
    stages = {}
    backend.add_stages(stages, options)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = src.make_ir(options, backend.get_codegen_implementation(), backend.get_module_map(), ctx)
    ttir = stages["ttir"](mod, metadata)
    ttir_text = str(ttir)
    return ttir_text, str(stages["ttadapter"](ttir, metadata))


def _signature(fn, ptr_types: dict, default_ptr: str, floats=("scale",)) -> dict:
    sig = {}
    for n in fn.arg_names:
        if n.endswith("_ptr"):
            sig[n] = ptr_types.get(n, default_ptr)
        elif n in floats:
            sig[n] = "fp32"
        elif n.isupper() and n.startswith(("BLOCK", "CAUSAL")):
            sig[n] = "constexpr"
        else:
            sig[n] = "i32"
    return sig


def _check(ttir: str, linalg: str, estimate: int) -> None:
    assert estimate <= tiles.UB_BUDGET, f"tile estimate {estimate} B > budget {tiles.UB_BUDGET} B"
    biggest = max((_numel(m.group(1)) * _BYTES[m.group(2)] for m in _TENSOR.finditer(ttir)), default=0)
    assert biggest <= tiles.UB_BUDGET // 2, f"a tensor of {biggest} B in the TTIR (budget {tiles.UB_BUDGET} B)"
    assert "DiscreteMemAccess" not in linalg and "ExtractedLoadOrStore" not in linalg, "discrete (per-element) access"
    for line in linalg.splitlines():
        if "memref.copy" in line:
            src_type = line.split(":", 1)[1].split(" to ")[0]
            assert "?" in src_type.split(",")[0], f"unbounded tile copy (masked-out lanes are read): {line.strip()}"


def _numel(dims: str) -> int:
    n = 1
    for d in dims.strip("x").split("x"):
        n *= int(d)
    return n


# configurations: (name, Hq, Hkv, Dqk, Dv, block size)
PAGED = [("gqa", 32, 8, 128, 128, 64), ("mla16", 16, 1, 576, 512, 64), ("mla128", 128, 1, 576, 512, 64),
         ("odd-dims", 12, 4, 80, 72, 16)]
VARLEN = [("gqa", 32, 8, 128, 128), ("mla-like", 16, 16, 192, 128), ("odd-dims", 12, 4, 80, 72)]
MERGE_D = [128, 512, 72]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("cfg", PAGED, ids=[c[0] for c in PAGED])
def test_paged_kernel_lowers_for_ascend(cfg, dtype):
    _, hq, hkv, dqk, dv, bs = cfg
    e = torch.empty(0, dtype=dtype).element_size()
    b = tiles.paged_blocks(hq // hkv, dqk, dv, bs, e)
    sig = _signature(paged._paged_decode_kernel, {n: "*i32" for n in ("bt_ptr", "req_ptr", "vis_ptr")} | {"lse_ptr": "*fp32"},
                     "*" + DTYPES[dtype])
    ttir, linalg = lower(paged._paged_decode_kernel, sig, b)
    _check(ttir, linalg, tiles.paged_tile_bytes(b["BLOCK_G"], b["BLOCK_N"], b["BLOCK_D"], b["BLOCK_DV"], e))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("cfg", VARLEN, ids=[c[0] for c in VARLEN])
def test_varlen_kernel_lowers_for_ascend(cfg, dtype, causal):
    _, hq, hkv, dqk, dv = cfg
    e = torch.empty(0, dtype=dtype).element_size()
    b = tiles.varlen_blocks(dqk, dv, e, "npu")
    int_ptrs = {n: "*i32" for n in ("cuq_ptr", "cuk_ptr", "qpos_ptr", "kpos_ptr", "tiles_ptr")}
    sig = _signature(varlen._varlen_kernel, int_ptrs | {"lse_ptr": "*fp32"}, "*" + DTYPES[dtype])
    ttir, linalg = lower(varlen._varlen_kernel, sig, {**b, "CAUSAL": causal})
    _check(ttir, linalg, tiles.varlen_tile_bytes(b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_D"], b["BLOCK_DV"], e))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("D", MERGE_D)
def test_merge_kernel_lowers_for_ascend(D, dtype):
    e = torch.empty(0, dtype=dtype).element_size()
    b = tiles.merge_blocks(D, e)
    sig = _signature(merge._merge_kernel, {n: "*fp32" for n in ("lse_first_ptr", "lse_rest_ptr", "out_lse_ptr")},
                     "*" + DTYPES[dtype])
    ttir, linalg = lower(merge._merge_kernel, sig, b)
    _check(ttir, linalg, tiles.merge_tile_bytes(b["BLOCK_R"], b["BLOCK_D"], e))


# probes for the checker: the shapes of the earlier merge (per-row mask) and paged kernel (gather)
@triton.jit
def per_row_mask(x_ptr, lim_ptr, out_ptr, D, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK)
    lim = tl.load(lim_ptr + r)
    x = tl.load(x_ptr + r[:, None] * D + d[None, :], mask=d[None, :] < lim[:, None], other=0.0)
    tl.store(out_ptr + r[:, None] * D + d[None, :], x)


@triton.jit
def gather(x_ptr, idx_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    j = tl.load(idx_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, tl.load(x_ptr + j, mask=i < n, other=0.0), mask=i < n)


def test_the_checks_catch_what_they_claim():
    """The checker itself: a per-row-masked load (the earlier merge) and a table gather (the
    earlier paged kernel) are flagged, so a pass above means something."""
    for fn, sig in ((per_row_mask, {"x_ptr": "*fp32", "lim_ptr": "*i32", "out_ptr": "*fp32", "D": "i32", "BLOCK": "constexpr"}),
                    (gather, {"x_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"})):
        ttir, linalg = lower(fn, sig, {"BLOCK": 16})
        with pytest.raises(AssertionError):
            _check(ttir, linalg, 0)
