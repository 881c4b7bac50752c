"""Rank-side functions for the PCP -> DCP hand-off tests (module level: GlooWorld pickles them).

Every rank builds the same global K/V of a packed batch from a seed, keeps its PCP rows
(``pcp_partition(...).index``), allocates its DCP block table with
:func:`cpattn.layout.allocate_block_table` (NaN-filled caches, so a slot never written shows),
runs the hand-off and returns its caches and block table for the test process to check.
"""
from __future__ import annotations

import torch

import cpattn
from cpattn import layout
from cpattn.testing import gloo as G


def make_rows(seed: int, lens, hkv: int, dk: int, dv: int):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    k = torch.randn(t, hkv, dk, generator=g)
    v = torch.randn(t, hkv, dv, generator=g)
    cu = torch.tensor([0] + torch.tensor(list(lens), dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int64)
    return k, v, cu


def handoff(seed, lens, ctx_lens, hkv, dk, dv, block_size, interleave, spare=1, spoil=None):
    """This rank's ``(k_cache, v_cache, block_table)`` after the hand-off of the batch ``lens``."""
    k, v, cu = make_rows(seed, lens, hkv, dk, dv)
    n, r = G.WORLD, G.RANK
    part = cpattn.pcp_partition(cu, n, r)
    cap = torch.tensor(lens) + torch.tensor(ctx_lens) + spare
    table, nblk = layout.allocate_block_table(cap, world_size=n, rank=r, block_size=block_size, interleave=interleave)
    kc = torch.full((nblk + 1, block_size, hkv, dk), float("nan"))
    vc = torch.full((nblk + 1, block_size, hkv, dv), float("nan"))
    rows = [k[part.index], v[part.index]]
    ctx = list(ctx_lens)
    if spoil is not None and r == 1 % n:
        if spoil == "cu_differs":
            cu = cu.clone()
            cu[-1] += 1
        elif spoil == "rows":
            rows = [x[:-1] for x in rows] if rows[0].shape[0] else [torch.zeros(1, hkv, dk), torch.zeros(1, hkv, dv)]
        elif spoil == "table_short":
            table = table[:, :1]
            ctx = [c + 4 * block_size for c in ctx]  # room is checked against the capacity
        elif spoil == "dtype":
            rows = [rows[0].double(), rows[1]]
        elif spoil == "block_out_of_range":
            table = table + kc.shape[0]
        elif spoil == "interleave":
            interleave = 3
    if spoil == "table_short":
        ctx = [c + 4 * block_size for c in ctx_lens]
    before = (kc.clone(), vc.clone())
    try:
        cpattn.pcp_to_dcp_handoff(rows, cu, [kc, vc], table, group=None, interleave=interleave, context_lens=ctx)
    except Exception:
        assert torch.equal(kc.isnan(), before[0].isnan()) and torch.equal(vc.isnan(), before[1].isnan()), \
            "a refused hand-off wrote into the cache"
        raise
    return kc, vc, table
