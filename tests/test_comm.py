"""cpattn.comm on real gloo ranks, and the GlooWorld harness that every distributed test uses."""
from __future__ import annotations

import time

import pytest
import torch

from cpattn import comm
from cpattn.testing.gloo import GlooWorld, RankErrors

import _comm_ranks as R

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("n", [2, 3, 4])
def test_collectives(gloo, n):
    res = gloo(n).run(R.collectives)
    for r, got in enumerate(res):
        assert got["gather"] == [[10.0 * i + j for j in range(3)] for i in range(n)]
        assert got["reduce"] == [n * (n + 1) / 2] * 2
        total = sum(i + 1 for i in range(n))
        assert got["scatter"] == [float(2 * r) * total, float(2 * r + 1) * total]
        assert got["a2a"] == [100.0 * i + r for i in range(n)]
        assert got["ring"] == [10.0 * ((r - 1) % n) + j for j in range(3)]
        assert got["ring_bytes"] == 12


@pytest.mark.parametrize("n", [3, 4])
def test_ring_goes_all_the_way_round_without_deadlock(gloo, n):
    res = gloo(n).run(R.ring_many_steps, 2 * n)
    for r, seen in enumerate(res):
        assert seen == [float((r - s) % n) for s in range(2 * n + 1)]


def test_single_process_needs_no_collective():
    # torch.distributed is not initialised in the test process: world 1, nothing sent.
    t = torch.arange(4.0)
    assert comm.world_size() == 1 and comm.rank() == 0
    assert torch.equal(comm.all_gather(t), t[None])
    assert comm.all_to_all(t) is t and comm.reduce_scatter_sum(t) is t
    with pytest.raises(ValueError, match="ValueError-local"):
        comm.agree("toy", ValueError("ValueError-local"), {"x": 1})
    comm.agree("toy", None, {"x": 1})
    with pytest.raises(ValueError, match="at least 2 ranks"):
        comm.RingComm()
    # preallocated outputs: the result lands in them; a wrong buffer is refused, not resized
    for fn in (comm.all_gather, comm.all_to_all, comm.reduce_scatter_sum):
        buf = torch.full((4,), -1.0)
        got = fn(t, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, t)
        for bad in (torch.empty(5), torch.empty(4, dtype=torch.float64), torch.empty(8)[::2]):
            with pytest.raises(ValueError, match="out must be a contiguous"):
                fn(t, out=bad)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("exc_type", ["ValueError", "TypeError"])
def test_one_rank_refusing_raises_on_every_rank(gloo, n, exc_type):
    outcomes = gloo(n).run_outcomes(R.refuse_on, n - 1, exc_type)
    assert not any(o.ok for o in outcomes)
    assert outcomes[n - 1].error_type == exc_type
    for o in outcomes[:-1]:
        assert o.error_type == "CollectiveInputError"
        assert f"rank(s) [{n - 1}]" in o.message and "refuses its input" in o.message
    # the world is still usable afterwards (nothing left half-way in a collective)
    assert gloo(n).run(R.agree_ok_then_collective) == [float(n)] * n


def test_disagreeing_field_raises_on_every_rank_naming_it(gloo):
    outcomes = gloo(3).run_outcomes(R.disagree_on_field)
    for o in outcomes:
        assert not o.ok and o.error_type == "CollectiveInputError"
        assert "cu_seqlens must be the same on every rank" in o.message and "ranks [1]" in o.message


def test_hang_fails_fast_and_world_restarts():
    with GlooWorld(2, timeout=3.0) as w:
        assert [x[:2] for x in w.run(R.rank_and_threads)] == [(0, 2), (1, 2)]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not answer"):
            w.run(R.hang_on_rank0, 30.0)
        assert time.monotonic() - t0 < 15
        # next call starts fresh workers
        assert [x[:2] for x in w.run(R.rank_and_threads)] == [(0, 2), (1, 2)]


def test_rank_errors_carry_every_outcome(gloo):
    with pytest.raises(RankErrors) as info:
        gloo(2).run(R.refuse_on, 0)
    assert [o.ok for o in info.value.outcomes] == [False, False]
    assert "rank 0: ValueError" in str(info.value)


def test_threads_per_rank(gloo):
    assert [x[2] for x in gloo(2).run(R.rank_and_threads)] == [1, 1]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype,numel", [("float64", 6), ("float32", 5), ("bfloat16", 3), ("int64", 4),
                                         ("uint8", 3), ("bool", 5), ("float64", 0)])
def test_hccl_safe_paths_equal_gloo_collectives(gloo, n, dtype, numel):
    # The paths comm takes on HCCL (bytes moved as int32/int8/fp32 words, list all-gather at world 3,
    # float64 sums as all-to-all + local sum (+ all-gather), odd-sized all-to-all blocks as batched P2P)
    # give bitwise what gloo's own collectives give. uint8 blocks of 3 bytes take the P2P path.
    # Every collective issued on that path is one HCCL publishes support for (docs/ascendc.md, HCCL).
    published = {
        "all_gather_flat": {"torch.bfloat16", "torch.float16", "torch.float32", "torch.int8", "torch.int32", "torch.bool"},
        "all_gather": {"torch.bfloat16", "torch.float16", "torch.float32", "torch.int8", "torch.int32", "torch.bool"},
        "reduce_scatter_flat": {"torch.bfloat16", "torch.float16", "torch.float32", "torch.int8", "torch.int32"},
        "all_reduce": {"torch.bfloat16", "torch.float16", "torch.float32", "torch.int32", "torch.int64", "torch.bool"},
        "all_to_all_single": {"torch.float32"},
        "p2p": {"torch.bfloat16", "torch.float16", "torch.float32", "torch.float64", "torch.uint8", "torch.int8",
                "torch.int16", "torch.int32", "torch.int64", "torch.bool"},
    }
    for got in gloo(n).run(R.portable_vs_native, dtype, numel):
        assert got["portable"] == got["native"]
        for path in ("native_out", "portable_out"):  # into preallocated buffers (a plan's workspace)
            flags = got[path].pop("in_place")
            assert got[path] == got["native"], path
            assert flags and all(flags), (path, flags)
        assert got["calls"], "the HCCL-safe path issued no collective"
        for name, dt in got["calls"]:
            assert dt in published[name], (name, dt)
            assert not (n in (3, 5, 6, 7) and name in ("all_gather_flat", "reduce_scatter_flat")), (name, n)
