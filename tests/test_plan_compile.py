"""torch.compile(fullgraph=True) of a two-layer function calling DcpDecodePlan.run (and the
all-gather PcpPrefillPlan.run): matches eager, and a new plan() with the same padded sizes runs the
compiled code again without recompiling (``torch.compiler.set_stance("fail_on_recompile")``)."""
from __future__ import annotations

import pytest

from _plan_ranks import compiled_two_layers


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("mla", [False, True])
def test_two_layers_compile_without_recompiling_world_one(compiler, mla):
    res = compiled_two_layers(compiler, mla)
    assert all(v == 0.0 for v in res.values()), res


@pytest.mark.distributed
@pytest.mark.parametrize("heads", ["replicated", "sharded"])
def test_two_layers_compile_on_gloo_ranks(gloo, heads):
    """The combine's collectives inside the compiled graph (dynamo, eager backend) on 2 ranks."""
    for res in gloo(2).run(compiled_two_layers, "eager", False, heads, timeout=120):
        assert all(v == 0.0 for v in res.values()), res
