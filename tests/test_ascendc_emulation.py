"""The AscendC emulation's own tests: one per strictness rule, each running a tiny kernel that
breaks it (tests/ascendc_emu/kernels.cpp) and expecting an error naming the rule; a kernel
that follows every rule runs clean; documented semantics (DataCopyPad padding, Cast rounding,
broadcast by block stride 0, every block runs) give the documented numbers.

The kernels are compiled once per session with the system C++ compiler against
csrc/ascendc/emu (no torch headers: a few seconds), cached by source hash.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "ascendc" / "emu"
SRC = [ROOT / "tests" / "ascendc_emu" / "kernels.cpp", EMU / "emu_core.cpp"]


class EmulationError(RuntimeError):
    def __init__(self, rule: str, msg: str):
        super().__init__(msg)
        self.rule = rule


@pytest.fixture(scope="session")
def emu_lib():
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler found: the AscendC emulation needs one")
    h = hashlib.sha256()
    for f in SRC + sorted(EMU.glob("*.h")):
        h.update(f.read_bytes())
    from cpattn.backends.ascendc_emu._build import build_dir

    out = build_dir() / "tests"
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"emu_test_{h.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{EMU}",
                            *map(str, SRC), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode:
            pytest.fail(f"the emulation test kernels do not compile:\n{r.stderr[-4000:]}")
        os.replace(tmp, lib)
    so = ctypes.CDLL(str(lib))
    so.emu_test_run.restype = ctypes.c_int
    so.emu_test_run.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    return so


def run(lib, name, blocks=1, x=None):
    """Run test kernel ``name``; returns y (float32 [1024]); raises EmulationError."""
    x = np.arange(1024, dtype=np.float32) if x is None else np.ascontiguousarray(x, dtype=np.float32)
    y = np.zeros(1024, dtype=np.float32)
    rule, err = ctypes.create_string_buffer(64), ctypes.create_string_buffer(2048)
    rc = lib.emu_test_run(name.encode(), blocks, x.ctypes.data, x.size, y.ctypes.data, y.size, rule, 64, err, 2048)
    if rc == 1:
        raise EmulationError(rule.value.decode(), err.value.decode())
    if rc != 0:
        raise RuntimeError(err.value.decode())
    return y


def test_a_kernel_that_follows_every_rule_runs_clean(emu_lib):
    x = np.random.default_rng(0).standard_normal(1024).astype(np.float32)
    y = run(emu_lib, "good_kernel", blocks=4, x=x)
    np.testing.assert_array_equal(y[:256], 2 * x[:256] + 1)
    assert (y[256:] == 0).all()
    run(emu_lib, "flag_mte2_v_ok")
    run(emu_lib, "gm_read_after_write_flag_ok")
    run(emu_lib, "gm_overlapping_writes_one_buffer_ok")


@pytest.mark.parametrize(
    "kernel, rule, words",
    [
        ("ub_overflow", "ub-overflow", "192 KiB - 256 B"),
        ("ub_rounding", "ub-overflow", "rounded up to 32"),
        ("ub_misaligned", "ub-align", "not 32-byte aligned"),
        ("ub_out_of_buffer", "ub-bounds", "beyond"),
        ("datacopy_unaligned", "datacopy-align", "not a multiple of 32"),
        ("datacopypad_elements_not_bytes", "datacopypad-params", "counts bytes"),
        ("datacopypad_to_veccalc", "datacopypad-params", "VECIN or VECOUT"),
        ("deque_without_enque", "queue-discipline", "DeQue"),
        ("double_free", "queue-discipline", "double free"),
        ("free_before_enque", "queue-discipline", "expected EnQue and DeQue first"),
        ("alloc_beyond_buffers", "queue-depth", "buffers in use"),
        ("enque_beyond_depth", "queue-depth", "depth 1"),
        ("vector_reads_before_deque", "tensor-state", "not yet EnQue"),
        ("leaked_tensor", "leak", "kernel ended"),
        ("repeat_over_255", "repeat-limit", "repeatTime 300"),
        ("mask_over_lanes", "vector-mask", "mask 65"),
        ("compares_count_unaligned", "count-align", "multiple of 256"),
        ("cast_bf16_without_mode", "cast-round-mode", "CAST_NONE"),
        ("missing_pipe_barrier", "pipe-race", "PipeBarrier<PIPE_V"),
        ("missing_flag_mte2_v", "pipe-race", "PIPE_MTE2"),
        ("scalar_read_without_flag", "pipe-race", "PIPE_S reads"),
        ("set_flag_never_waited", "flag-balance", "never waited"),
        ("wait_flag_never_set", "flag-balance", "no matching SetFlag"),
        ("gm_out_of_bounds", "gm-bounds", "out of bounds"),
        ("select_without_reserved_ub", "reserved-ub", "8 KiB"),
        ("gm_read_after_write_no_flag", "pipe-race", "MTE3_MTE2"),
        ("gm_overlapping_writes_no_barrier", "pipe-race", "PipeBarrier<PIPE_MTE3>"),
        ("vector_partial_overlap", "operand-overlap", "overlap partly"),
        ("level0_overlap_across_repeats", "operand-overlap", "later repeat"),
    ],
)
def test_each_broken_rule_raises_naming_it(emu_lib, kernel, rule, words):
    with pytest.raises(EmulationError) as info:
        run(emu_lib, kernel)
    assert info.value.rule == rule
    msg = str(info.value)
    assert f"ascendc-emu rule '{rule}'" in msg and words in msg, msg


@pytest.mark.parametrize("kernel", ["blocks_write_same_bytes", "block_reads_what_another_writes"])
def test_blocks_racing_on_global_memory(emu_lib, kernel):
    run(emu_lib, kernel, blocks=1)  # one block alone is fine
    with pytest.raises(EmulationError, match="block-overlap") as info:
        run(emu_lib, kernel, blocks=3)
    assert info.value.rule == "block-overlap"


def test_barriers_and_flags_are_recorded(emu_lib):
    run(emu_lib, "good_kernel", blocks=2)
    buf = ctypes.create_string_buffer(4096)
    n = emu_lib.emu_test_log(buf, 4096)
    assert buf.value.decode().splitlines() == ["PipeBarrier PIPE_V", "SetFlag PIPE_V->PIPE_S 1", "WaitFlag PIPE_V->PIPE_S 1"]
    assert n == 3


def test_every_block_runs(emu_lib):
    y = run(emu_lib, "every_block_runs", blocks=37)
    np.testing.assert_array_equal(y[0:37 * 8:8], np.arange(37))


def test_datacopypad_units_and_padding(emu_lib):
    y = run(emu_lib, "datacopypad_semantics")
    x = np.arange(1024, dtype=np.float32)
    # GM side in bytes (a 4-byte gap skips x[5]); UB rows padded to 32 bytes with the pad value
    np.testing.assert_array_equal(y[0:8], [*x[0:5], 9, 9, 9])
    np.testing.assert_array_equal(y[8:16], [*x[6:11], 9, 9, 9])
    # no padding asked: the dummy bytes repeat the block's first element
    np.testing.assert_array_equal(y[16:24], [*x[20:25], 20, 20, 20])
    np.testing.assert_array_equal(y[24:32], [*x[25:30], 25, 25, 25])
    # UB -> GM: 5 floats per 32-byte UB row, 4 bytes apart in GM (y[69] untouched)
    np.testing.assert_array_equal(y[64:75], [*x[0:5], 0, *x[6:11]])


def test_cast_round_modes(emu_lib):
    g = np.random.default_rng(1)
    x = np.concatenate([g.standard_normal(40) * 10.0 ** g.integers(-6, 6, 40),
                        # exact ties between two bfloat16 values: round-to-nearest-even decides
                        (torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.0e38, -7e-39,
                                       65520.0, 1e-8, 2 ** -24 * 1.5])).numpy(),
                        [np.inf, -np.inf, np.nan, 0.0, -0.0, 1.0, 2.0, 0.1, 1e5, 5e-5, 6e-8, -6e-8, 300.5, 7, 8, 9]
                        ]).astype(np.float32)
    assert x.size == 64
    y = run(emu_lib, "cast_semantics", x=np.pad(x, (0, 960)))
    xt = torch.from_numpy(x)
    torch.testing.assert_close(torch.from_numpy(y[:64]), xt.to(torch.bfloat16).float(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(y[64:128]), xt.to(torch.float16).float(), rtol=0, atol=0, equal_nan=True)
    # truncation: toward zero, never larger in magnitude
    t = torch.from_numpy(y[128:192])
    fin = torch.isfinite(xt)
    assert (t[fin].abs() <= xt[fin].abs()).all()
    bits = xt[fin].view(torch.int32) & ~0xFFFF
    torch.testing.assert_close(t[fin], bits.view(torch.float32), rtol=0, atol=0)


def test_level0_broadcast_mul(emu_lib):
    x = np.random.default_rng(2).standard_normal(1024).astype(np.float32)
    y = run(emu_lib, "broadcast_mul_semantics", x=x)
    rows = x[:64].reshape(4, 16)
    expect = np.zeros((4, 16), np.float32)
    expect[:, :12] = rows[:, :12] * x[64:68, None]
    np.testing.assert_array_equal(y[:64].reshape(4, 16), expect)


def test_reduce_repeat(emu_lib):
    x = np.random.default_rng(3).standard_normal(1024).astype(np.float32)
    y = run(emu_lib, "reduce_repeat_semantics", x=x)
    for r in range(2):
        v = x[r * 64:(r + 1) * 64].copy()
        while v.size > 1:  # the documented binary tree over adjacent pairs, in float32
            v = (v[0::2] + v[1::2]).astype(np.float32)
        assert y[r] == v[0]
        seg = x[r * 64:(r + 1) * 64]
        assert y[8 + 2 * r] == seg.max() and y[9 + 2 * r].view(np.uint32) == seg.argmax()
        assert y[16 + r] == seg.min()
