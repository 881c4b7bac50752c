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


def test_opcheck_plan_run_ops_world_one():
    """The two opaque run ops: schema, fake implementation and real one agree (torch.library.opcheck)."""
    import torch

    import cpattn
    import pcp_ranks
    from _dcp_ranks import local_inputs

    p = {"seed": 3, "world": 1, "bs": 4, "il": 1, "mla": False, "heads": "replicated", "hq": 4, "hkv": 2, "dqk": 8,
         "dv": 8, "lens": [9, 3], "nq": [2, 1], "dtype": "float32"}
    inp = local_inputs(p, 1, 0)
    kc, vc = inp["k_cache"].nan_to_num(0.0), inp["v_cache"].nan_to_num(0.0)
    plan = cpattn.DcpDecodePlan(None, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, max_num_seqs=2,
                                max_num_tokens=5, max_blocks_per_seq=inp["block_table"].shape[1],
                                dtype=torch.float32, device="cpu")
    plan.plan(inp["seq_lens"], inp["block_table"], inp["query_start_loc"])
    q = torch.cat([inp["q"], torch.randn(2, 4, 8)])
    torch.library.opcheck(torch.ops.cpattn.dcp_plan_run.default, (q, kc, vc, plan._key))
    q2, k2, v2, cu = pcp_ranks.make_batch(2, [9, 4], 4, 2, 16, 8, torch.float32)
    pp = cpattn.PcpPrefillPlan(None, method="allgather").plan(cu)
    torch.library.opcheck(torch.ops.cpattn.pcp_plan_run.default, (q2, k2, v2, pp._key))


def test_dcp_plan_on_the_triton_backend_world_one():
    """DcpDecodePlan.run with backend="triton" (CPU interpreter) equals the one-call op on it."""
    import torch

    import cpattn
    from _dcp_ranks import local_inputs

    p = {"seed": 4, "world": 1, "bs": 4, "il": 1, "mla": True, "heads": "replicated", "hq": 4, "hkv": 1, "dqk": 12,
         "dv": 8, "lens": [9, 30, 1], "nq": [2, 1, 1], "dtype": "bfloat16"}
    inp = local_inputs(p, 1, 0)
    plan = cpattn.DcpDecodePlan(None, num_heads=4, num_kv_heads=1, head_dim=12, block_size=4, v_head_dim=8,
                                mla=True, max_num_seqs=3, max_num_tokens=6,
                                max_blocks_per_seq=inp["block_table"].shape[1], dtype=torch.bfloat16, device="cpu",
                                backend="triton")
    assert plan.config.kernel_backend == "triton"
    plan.plan(inp["seq_lens"], inp["block_table"], inp["query_start_loc"])
    out, lse = plan.run(torch.cat([inp["q"], inp["q"][:2]]), inp["k_cache"], None, return_lse=True)
    o1, l1 = cpattn.dcp_decode_attention(inp["q"], inp["k_cache"], None, inp["block_table"], inp["seq_lens"],
                                         group=None, query_start_loc=inp["query_start_loc"], v_head_dim=8,
                                         return_lse=True, backend="triton")
    assert torch.equal(out[:4], o1) and torch.equal(lse[:4], l1)
    assert torch.equal(out[4:], torch.zeros_like(out[4:])) and torch.isneginf(lse[4:]).all()
