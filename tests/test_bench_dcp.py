"""``cpattn-bench dcp`` stays runnable: a tiny checked run on 2 gloo ranks, bytes == formula."""
from __future__ import annotations

import pytest

from cpattn.bench import dcp as bench_dcp

pytestmark = pytest.mark.distributed


def test_bench_dcp_small_checked_run():
    rows, ok = bench_dcp.bench(["gqa", "mla"], [2], context=300, batch=2, dtype="bfloat16", bs=16, iters=1,
                               combine_iters=2, check=True)
    assert ok
    assert {(r["shape"], r["heads"], r["combine"]) for r in rows} == {
        (s, h, c) for s in ("gqa", "mla") for h, cs in (("replicated", ("all_gather", "lse_reduce")),
                                                          ("sharded", ("all_gather", "lse_reduce", "all_to_all")))
        for c in cs}
    for r in rows:
        assert r["bytes"] == r["formula"] > 0 and r["check"].startswith("ok")
        assert len(r["local_ms"].split("/")) == 2 and r["combine_ms"] > 0


def test_bench_per_layer_tables():
    """The plan/run vs one-call tables of ``cpattn-bench dcp`` and ``pcp`` (small, 2 layers)."""
    from cpattn.bench import pcp as bench_pcp

    rows = bench_dcp.bench_layers(["gqa"], [2], context=300, batch=2, dtype="bfloat16", bs=16, layers=2, steps=1)
    assert [(r["heads"], r["layers"]) for r in rows] == [("replicated", 2), ("sharded", 2)]
    assert all(r["run_ms"] > 0 and r["op_ms"] > 0 and r["plan_ms"] > 0 for r in rows)
    rows = bench_pcp.bench_layers(200, 4, 2, 16, 16, "bfloat16", [2], ["ring", "allgather"], layers=2, iters=1,
                                  threads=1)
    assert [r["method"] for r in rows] == ["ring", "allgather"] and all(r["run_ms"] > 0 for r in rows)
