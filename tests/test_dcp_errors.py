"""Bad DCP input raises a clear error on EVERY rank (never a hang), and nothing is written.

Each case breaks the input on one rank (or all) of a real gloo world. The rank that sees the
problem raises its own TypeError/ValueError naming the argument; the others raise
:class:`cpattn.comm.CollectiveInputError` naming the rank and its message (through
``comm.agree``). A hang would surface as GlooWorld's TimeoutError. Afterwards the same world
runs a valid call, so no rank was left inside a collective.
"""
from __future__ import annotations

import pytest

from _dcp_ranks import run_bad

pytestmark = pytest.mark.distributed

BASE = {"seed": 2, "bs": 4, "il": 1, "mla": False, "heads": "replicated", "hkv": 2, "dqk": 8, "dv": 8,
        "lens": [9, 30, 2], "nq": [1, 2, 1], "dtype": "float32"}

# (world, overrides of BASE, mutation, bad rank or None for all, pattern of the bad ranks' message)
CASES = {
    "interleave_not_dividing": (2, {}, "interleave_not_dividing", None, r"interleave \(3\) must divide the cache block_size \(4\)"),
    "interleave_differs": (3, {}, "interleave_differs", 1, r"interleave"),
    "lengths_beyond_table": (2, {}, "table_too_short", 1, r"block_table has room for 4"),
    "cache_sharded_for_other_world": (2, {"lens": [64, 40], "nq": [1, 1], "shard_world": 4}, "none", None,
                                      r"different world size"),
    "dtype_mismatch": (2, {}, "dtype", 0, r"k_cache and q must have the same dtype"),
    "device_mismatch": (3, {}, "device", 2, r"same device"),
    "seq_lens_differ": (2, {"lens": [6, 6, 6]}, "seq_lens_differ", 0, r"seq_lens must be the same on every rank"),
    "heads_not_divisible_sharded": (4, {"heads": "sharded", "hkv": 1}, "uneven_heads", 3, r"q shape"),
    "block_id_out_of_range": (2, {}, "block_id_out_of_range", 1, r"outside k_cache's"),
    "mla_without_v_head_dim": (2, {"mla": True, "hkv": 1, "dv": 6}, "mla_without_v_head_dim", None,
                               r"v_head_dim is required"),
    "combine_not_for_replicated": (2, {"combine": "all_to_all"}, "none", None, r"combine='all_to_all' is not available"),
    "combine_differs": (3, {"combine": "lse_reduce"}, "combine_differs", 2, r"combine"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_on_every_rank(gloo, name):
    world, over, mutation, bad_rank, pattern = CASES[name]
    p = {**BASE, "world": world, **over}
    p["hq"] = 2 * world if p["heads"] == "sharded" else 4
    outcomes = gloo(world).run_outcomes(run_bad, p, mutation, bad_rank)
    for r, o in enumerate(outcomes):
        assert not o.ok, f"rank {r} accepted the bad input ({name})"
        assert o.error_type in ("ValueError", "TypeError", "CollectiveInputError"), f"rank {r}: {o.error_type}: {o.message}"
        assert "was written" not in o.message, o.message
        assert "dcp_decode_attention" in o.message, f"rank {r} message does not name the op: {o.message}"
    import re
    bad = range(world) if bad_rank is None else [bad_rank]
    for r in bad:
        assert re.search(pattern, outcomes[r].message), f"rank {r}: {outcomes[r].message!r} !~ {pattern!r}"
    if bad_rank is not None:  # the others say which rank refused, or which field differs
        for r in set(range(world)) - {bad_rank}:
            assert outcomes[r].error_type == "CollectiveInputError", outcomes[r]
    # the world is still in step: a valid call on the same ranks works
    good = {**p, "combine": None, "shard_world": None}
    assert gloo(world).run(run_bad, good, "none", None) == ["no error"] * world
