"""Every public op inside torch.compile(fullgraph=True) on CPU (world size 1: no process group).

The merge ops are covered in test_merge.py; here the distributed ops, which reach the compiler
as opaque torch.ops.cpattn.* calls with their fake implementations giving the shapes.
"""
from __future__ import annotations

import pytest
import torch

import cpattn
from cpattn import layout


def _dcp_inputs(mla: bool):
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    hkv, d, dv = (1, 12, 8) if mla else (2, 8, 8)
    k = torch.randn(int(lens.sum()), hkv, d, generator=g)
    v = None if mla else torch.randn(int(lens.sum()), hkv, dv, generator=g)
    shard = layout.shard_kv(k, v, lens, world_size=1, block_size=4)[0]
    q = torch.randn(2, 4, d, generator=g)
    return q, shard.k_cache, shard.v_cache, shard.block_table, lens, (dv if mla else None)


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_dcp_decode_attention_compiles_fullgraph(mla, compiler):
    q, kc, vc, bt, lens, dv = _dcp_inputs(mla)
    exp, exp_lse = cpattn.dcp_decode_attention(q, kc, vc, bt, lens, group=None, v_head_dim=dv, return_lse=True)

    @torch.compile(fullgraph=True, backend=compiler)
    def f(q, kc, vc, bt, lens):
        out, lse = cpattn.dcp_decode_attention(q, kc, vc, bt, lens, group=None, v_head_dim=dv, return_lse=True)
        return out * 2, lse

    out, lse = f(q, kc, vc, bt, lens)
    torch.testing.assert_close(out, exp * 2, rtol=0, atol=0)
    torch.testing.assert_close(lse, exp_lse, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ring", "allgather"])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_pcp_ring_prefill_compiles_fullgraph(method, compiler):
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 7, 20])
    q, k, v = torch.randn(20, 4, 16, generator=g), torch.randn(20, 2, 16, generator=g), torch.randn(20, 2, 8, generator=g)
    exp, exp_lse = cpattn.pcp_ring_prefill(q, k, v, cu, group=None, method=method, return_lse=True)

    @torch.compile(fullgraph=True, backend=compiler)
    def f(q, k, v, cu):
        out, lse = cpattn.pcp_ring_prefill(q, k, v, cu, group=None, method=method, return_lse=True)
        return out + 1, lse

    out, lse = f(q, k, v, cu)
    torch.testing.assert_close(out, exp + 1, rtol=0, atol=0)
    torch.testing.assert_close(lse, exp_lse, rtol=0, atol=0)
