"""Rank-side helpers for tests/test_numerics.py (module-level: GlooWorld pickles them by reference).

Every rank builds the same global tensors (the DCP and PCP test builders), puts the same NaN/inf
into them (:func:`poison`), keeps its own shard or rows, and runs the op.
"""
from __future__ import annotations

import torch

import cpattn
from cpattn import comm, layout
from cpattn.testing import gloo as G
from _dcp_ranks import make_case
import pcp_ranks


def poison(x: torch.Tensor, row: int, head: int, chan: int, value: float) -> torch.Tensor:
    """A copy of ``x [rows, H, D]`` with ``value`` at ``[row, head, chan]`` (indices wrap)."""
    x = x.clone()
    if x.numel():
        x[row % x.shape[0], head % x.shape[1], chan % x.shape[2]] = value
    return x


def poisoned_case(p: dict, where: dict) -> dict:
    """DCP case ``p`` with one value replaced: ``where = {"tensor": "q"|"k"|"v", "row", "head",
    "chan", "value"}`` ("v" of an MLA case hits K's first ``dv`` channels, which are its V)."""
    c = make_case(p)
    name = where["tensor"]
    if name == "v" and c["v"] is None:
        name, where = "k", {**where, "chan": where["chan"] % p["dv"]}
    c[name] = poison(c[name], where["row"], where["head"], where["chan"], where["value"])
    return c


def dcp_poisoned(p: dict, where: dict, combines: list[str]) -> dict:
    """On every rank: ``{combine: (out, lse)}`` of DCP decode over the poisoned case."""
    world, rank = comm.world_size(), comm.rank()
    c = poisoned_case(p, where)
    sh = layout.shard_kv(c["k"], c["v"], c["seq_lens"], world_size=world, block_size=p["bs"], interleave=p["il"],
                         spare_blocks=1, generator=torch.Generator().manual_seed(p["seed"] + 1),
                         fill=float("nan"))[rank]
    q = c["q"]
    if p["heads"] == "sharded":
        s = q.shape[1] // world
        q = q[:, rank * s:(rank + 1) * s].contiguous()
    res = {}
    for cmb in combines:
        res[cmb] = cpattn.dcp_decode_attention(
            q, sh.k_cache, sh.v_cache, sh.block_table, c["seq_lens"], group=None, query_start_loc=c["qsl"],
            interleave=p["il"], v_head_dim=p["dv"] if p["mla"] else None, heads=p["heads"], combine=cmb,
            return_lse=True, backend=p.get("backend"))
    return res


def pcp_poisoned(seed, lens, hq, hkv, dqk, dv, dtype, causal, method, where: dict):
    """This rank's ``(index, out, lse)`` of PCP prefill over a batch with one poisoned value."""
    q, k, v, cu = pcp_ranks.make_batch(seed, lens, hq, hkv, dqk, dv, dtype)
    t = {"q": q, "k": k, "v": v}
    t[where["tensor"]] = poison(t[where["tensor"]], where["row"], where["head"], where["chan"], where["value"])
    i = cpattn.pcp_partition(cu, G.WORLD, G.RANK).index
    out, lse = cpattn.pcp_ring_prefill(t["q"][i], t["k"][i], t["v"][i], cu, group=None, causal=causal,
                                       method=method, return_lse=True)
    return i, out, lse


def pcp_context_poisoned(method: str, poisoned: bool):
    """PCP with a cached context (2 requests, DCP layout over the group); with ``poisoned`` the
    cached value of request 0's token 3, KV head 0, is NaN. Returns ``(index, out, lse)``."""
    lens, ctx_lens = [20, 9], [17, 6]
    q, k, v, cu, kc, vc = pcp_ranks.make_context_batch(3, lens, ctx_lens, 4, 2, 16, 16, torch.float32)
    if poisoned:
        vc = vc.clone()
        vc[3, 0, 5] = float("nan")
    sh = layout.shard_kv(kc, vc, torch.tensor(ctx_lens), world_size=G.WORLD, block_size=4, interleave=1)[G.RANK]
    ctx = cpattn.PcpContext(sh.k_cache, sh.v_cache, sh.block_table, torch.tensor(ctx_lens), 1)
    i = cpattn.pcp_partition(cu, G.WORLD, G.RANK).index
    out, lse = cpattn.pcp_ring_prefill(q[i], k[i], v[i], cu, group=None, method=method, return_lse=True, context=ctx)
    return i, out, lse
