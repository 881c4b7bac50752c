"""Block sizes of the Triton kernels: within the unified-buffer budget for every configuration,
and the chunked work items (heads and V channels past a block) correct under the interpreter."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cpattn import reference
from conftest import examples
from tolerance import assert_close

pytest.importorskip("triton", reason="the triton package is not installed (pip install cpattn[triton])")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=examples(200, 5000))
@given(G=st.integers(1, 256), dqk=st.integers(1, 1024), dv=st.integers(1, 1024), bs=st.integers(1, 512),
       elem=st.sampled_from([2, 4]), dev=st.sampled_from(["cpu", "cuda", "npu"]))
def test_blocks_fit_the_budget(G, dqk, dv, bs, elem, dev):
    from cpattn.backends.triton import tiles

    p = tiles.paged_blocks(G, dqk, dv, bs, elem)
    v = tiles.varlen_blocks(dqk, dv, elem, dev)
    for b in (p, v):
        assert all(x >= 16 and x & (x - 1) == 0 for x in b.values()), b
    assert tiles.paged_tile_bytes(p["BLOCK_G"], p["BLOCK_N"], p["BLOCK_D"], p["BLOCK_DV"], elem) <= tiles.UB_BUDGET
    assert tiles.varlen_tile_bytes(v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_D"], v["BLOCK_DV"], elem) <= tiles.UB_BUDGET
    m = tiles.merge_blocks(dv, elem)
    assert tiles.merge_tile_bytes(m["BLOCK_R"], m["BLOCK_D"], elem) <= tiles.UB_BUDGET


def test_mla_128_heads_is_split_not_one_huge_tile():
    """The issue's case: 128 query heads x 512 V channels in float32 was a 256 KiB tile."""
    from cpattn.backends.triton import tiles

    b = tiles.paged_blocks(128, 576, 512, 64, 4)
    assert b["BLOCK_G"] * b["BLOCK_DV"] * 4 <= 64 * 1024 and b["BLOCK_G"] < 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_heads_and_channels_match_reference(monkeypatch, dtype):
    """A budget small enough that the head group (G=20) and V (Dv=40) span several work items
    (paged: heads and channels; varlen: channels); results against the float64 reference."""
    from cpattn.backends import get_backend
    from cpattn.backends.triton import tiles

    monkeypatch.setattr(tiles, "UB_BUDGET", 12 * 1024)
    assert tiles.paged_blocks(20, 24, 40, 16, dtype.itemsize)["BLOCK_G"] < 20
    assert tiles.paged_blocks(20, 24, 40, 16, dtype.itemsize)["BLOCK_DV"] < 40
    assert tiles.varlen_blocks(24, 40, dtype.itemsize, "cpu")["BLOCK_DV"] < 40
    g = torch.Generator().manual_seed(7)
    # paged: one request of 21 keys in pages of 16, two query tokens seeing 21 and 5 keys
    L, bs, hq, d, dv = 21, 16, 20, 24, 40
    k = torch.randn(L, 1, d, generator=g)
    v = torch.randn(L, 1, dv, generator=g)
    q = torch.randn(2, hq, d, generator=g)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    k_cache = torch.full((2, bs, 1, d), math.nan)
    v_cache = torch.full((2, bs, 1, dv), math.nan)
    k_cache[1], k_cache[0, :L - bs] = k[:bs], k[bs:]
    v_cache[1], v_cache[0, :L - bs] = v[:bs], v[bs:]
    vis = torch.tensor([21, 5], dtype=torch.int32)
    out, lse = get_backend("triton").run(
        "paged_attention", q=q.to(dtype).to(DEVICE), k_cache=k_cache.to(dtype).to(DEVICE),
        v_cache=v_cache.to(dtype).to(DEVICE), block_table=table.to(DEVICE),
        query_start_loc=torch.tensor([0, 2], dtype=torch.int32).to(DEVICE), visible_lens=vis.to(DEVICE),
        scale=0.25, v_head_dim=dv, max_query_len=2, max_kv_len=21)
    kw = dict(cu_seqlens_q=torch.tensor([0, 2]), cu_seqlens_k=torch.tensor([0, L]), causal=True, scale=0.25,
              q_positions=vis.long() - 1, k_positions=torch.arange(L))
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    ro, rl = reference.attention(qd, kd, vd, **kw)
    bo, bl = reference.attention(qd, kd, vd, **kw, dtype=dtype)
    assert_close(out.cpu(), ro, bo.to(dtype), dtype=dtype)
    assert_close(lse.cpu(), rl, bl, dtype=torch.float32, what="lse")
    # varlen: 19 queries (two row tiles) over 23 keys, GQA 4/2, causal
    q2 = torch.randn(19, 4, d, generator=g).to(dtype)
    k2 = torch.randn(23, 2, d, generator=g).to(dtype)
    v2 = torch.randn(23, 2, dv, generator=g).to(dtype)
    kw2 = dict(cu_seqlens_q=torch.tensor([0, 19]), cu_seqlens_k=torch.tensor([0, 23]), causal=True, scale=0.25)
    out2, lse2 = get_backend("triton").run("attention", q=q2.to(DEVICE), k=k2.to(DEVICE), v=v2.to(DEVICE),
                                           **{n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in kw2.items()})
    ro2, rl2 = reference.attention(q2, k2, v2, **kw2)
    bo2, bl2 = reference.attention(q2, k2, v2, **kw2, dtype=dtype)
    assert_close(out2.cpu(), ro2, bo2.to(dtype), dtype=dtype)
    assert_close(lse2.cpu(), rl2, bl2, dtype=torch.float32, what="lse")
