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
