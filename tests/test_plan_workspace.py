"""Issue 8's "the constructor allocates every buffer run needs, once": on real gloo ranks, for
every combine of both head modes (GQA and MLA),

* every collective of ``run`` sends from and receives into the plan's workspace
  (:mod:`cpattn.dcp_workspace`), allocated at construction;
* the local kernel's scratch (the PyTorch kernel's chunk buffers) is the one reserved at
  construction, at the largest size any step can need (a longer context does not grow it);
* with static bounds (what graph capture uses), the sizes ``run`` allocates are the same for a
  step of short contexts and a step of long ones with other batch sizes: nothing is sized by
  the data, only by ``q``'s padded rows (the bucket, ``max_num_tokens``); without them ``q`` has
  one padding row;
* ``run`` never returns a view of the workspace (the next layer would overwrite it).

GQA runs in float32 (float64 partial LSEs), MLA in bfloat16 (float32 ones).
"""
from __future__ import annotations

import pytest

from _plan_ranks import dcp_allocations_all
from cpattn import dcp_combine

pytestmark = pytest.mark.distributed

_BASE = {"bs": 4, "il": 2, "hkv": 2, "dqk": 8, "dv": 8, "dtype": "float32", "seed": 5}


def _steps(world, heads, mla):
    over = {"hkv": 1, "dqk": 12, "dv": 8, "dtype": "bfloat16"} if mla else {}  # GQA float32, MLA bfloat16
    hq = (2 if mla else 4) * (world if heads == "sharded" else 1)
    base = {**_BASE, **over, "world": world, "heads": heads, "mla": mla, "hq": hq}
    return [{**base, "lens": [9, 3, 2], "nq": [1, 2, 1]},               # short contexts
            {**base, "seed": 6, "lens": [700, 1203], "nq": [1, 1]},      # long ones, fewer requests
            {**base, "seed": 7, "lens": [5, 340, 17, 96], "nq": [1, 1, 1, 1]}]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("heads", ["replicated", "sharded"])
@pytest.mark.parametrize("mla", [False, True])
def test_run_uses_the_plans_buffers_and_allocates_nothing_sized_by_data(gloo, world, heads, mla):
    steps = _steps(world, heads, mla)
    by_rank = gloo(world).run(dcp_allocations_all, steps, dcp_combine.allowed(heads), timeout=240)
    for (combine, static) in by_rank[0]:
        for r, got in enumerate(by_rank):
            rr = got[(combine, static)]
            what = f"rank {r} {combine} static={static}"
            assert rr["workspace_bytes"] > 0 and rr["kernel_bytes"] > 0, what
            for i, st in enumerate(rr["steps"]):
                assert not st["aliases_workspace"], f"{what} step {i}: run returned a view of the workspace"
                colls = st["collectives"]
                assert colls, what + ": no collective recorded"
                assert all(ok for _, ok in colls), f"{what} step {i}: a collective wrote outside the workspace: {colls}"
                assert st["kernel_storages"] == rr["reserved"], \
                    f"{what} step {i}: the kernel allocated new scratch (reserve too small)"
            if static:
                sizes = [st["fresh"] for st in rr["steps"]]
                assert sizes[0] == sizes[1] == sizes[2], \
                    f"{what}: allocations depend on the step's data: " + \
                    "; ".join(str(st["fresh_ops"]) for st in rr["steps"])
