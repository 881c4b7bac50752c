"""Rank-side helpers for the DCP tests (module-level so GlooWorld can pickle them by reference).

A *case* is a plain dict of sizes and a seed; every rank (and the test process, for the oracle)
builds the same global tensors from it with :func:`make_case`, then each rank shards them with
:func:`cpattn.layout.shard_kv` and keeps its own shard. Spare cache blocks are filled with NaN
and block ids shuffled, so a kernel that reads outside a request's blocks fails the test.
"""
from __future__ import annotations

from unittest import mock

import torch
import torch.distributed as dist

import cpattn
from cpattn import comm, dcp_combine, layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_case(p: dict) -> dict:
    """Global tensors of case ``p``: ``q [T, Hq, Dqk]``, ``k [sum L, Hkv, Dqk]``, ``v`` (None
    for MLA), ``seq_lens [B]`` and ``query_start_loc [B+1]`` int32."""
    g = torch.Generator().manual_seed(p["seed"])
    dt = DTYPES[p["dtype"]]
    lens, nq = p["lens"], p["nq"]
    total, T = sum(lens), sum(nq)
    k = torch.randn(total, p["hkv"], p["dqk"], generator=g).to(dt)
    v = None if p["mla"] else torch.randn(total, p["hkv"], p["dv"], generator=g).to(dt)
    q = (torch.randn(T, p["hq"], p["dqk"], generator=g) * p.get("qscale", 1.5)).to(dt)
    qsl = torch.tensor([0] + nq, dtype=torch.int64).cumsum(0).to(torch.int32)
    return {"q": q, "k": k, "v": v, "seq_lens": torch.tensor(lens, dtype=torch.int32), "qsl": qsl}


def local_inputs(p: dict, world: int, rank: int, shard_world: int | None = None) -> dict:
    """This rank's op inputs for case ``p`` (cache sharded for ``shard_world``, default ``world``)."""
    c = make_case(p)
    shards = layout.shard_kv(c["k"], c["v"], c["seq_lens"], world_size=shard_world or world,
                             block_size=p["bs"], interleave=p["il"], spare_blocks=1,
                             generator=torch.Generator().manual_seed(p["seed"] + 1), fill=float("nan"))
    sh = shards[rank % len(shards)]
    q = c["q"]
    if p["heads"] == "sharded":
        s = q.shape[1] // world
        q = q[:, rank * s:(rank + 1) * s].contiguous()
    return {"q": q, "k_cache": sh.k_cache, "v_cache": sh.v_cache, "block_table": sh.block_table,
            "seq_lens": c["seq_lens"], "query_start_loc": c["qsl"], "interleave": p["il"],
            "v_head_dim": p["dv"] if p["mla"] else None, "heads": p["heads"]}


def _call(inp: dict, **kw):
    return cpattn.dcp_decode_attention(
        inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], group=None,
        query_start_loc=inp["query_start_loc"], interleave=inp["interleave"], v_head_dim=inp["v_head_dim"],
        heads=inp["heads"], return_lse=True, **kw)


def run_case(p: dict, combines: list[str]) -> dict:
    """On every rank: the op's ``(out, lse, comm records)`` for each combine strategy."""
    world, rank = comm.world_size(), comm.rank()
    inp = local_inputs(p, world, rank)
    res = {}
    for cmb in combines:
        with dcp_combine.count_bytes() as recs:
            out, lse = _call(inp, combine=cmb, backend=p.get("backend"))
        res[cmb] = (out, lse, [(r.purpose, r.collective, r.bytes_in, r.bytes_sent) for r in recs])
    return res


def run_case_hccl_safe(p: dict, combines: list[str]) -> dict:
    """run_case with comm's HCCL-safe collectives (comm.PORTABLE_BACKENDS) on gloo."""
    with mock.patch.object(comm, "PORTABLE_BACKENDS", frozenset({"gloo"})):
        return run_case(p, combines)


def run_without_collectives(p: dict, combines: list[str]) -> dict:
    """World size 1 with every collective patched to fail: proves none is called."""
    def boom(*a, **k):
        raise AssertionError("a collective was called at world size 1")

    patches = [mock.patch.object(comm, "_all_gather_flat", boom), mock.patch.object(comm, "_reduce_scatter_flat", boom)]
    for name in ("all_reduce", "all_to_all_single", "all_gather_object", "all_gather", "broadcast"):
        patches.append(mock.patch.object(dist, name, boom))
    for pt in patches:
        pt.start()
    try:
        return run_case(p, combines)
    finally:
        for pt in patches:
            pt.stop()


def run_bad(p: dict, mutation: str, bad_rank: int | None) -> str:
    """Apply ``mutation`` on ``bad_rank`` (None: every rank), call the op, and check that no input
    was written before re-raising whatever it raised. Returns "no error" if the op accepted it."""
    world, rank = comm.world_size(), comm.rank()
    inp = local_inputs(p, world, rank, shard_world=p.get("shard_world"))
    if bad_rank is None or rank == bad_rank:
        _mutate(inp, mutation)
    before = {k: v.clone() for k, v in inp.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    try:
        _call(inp, combine=inp.get("combine", p.get("combine")))
    except Exception:
        for k, v in before.items():
            assert torch.equal(inp[k].nan_to_num(0.0), v.nan_to_num(0.0)) if v.is_floating_point() else torch.equal(inp[k], v), \
                f"{k} was written by a call that failed"
        raise
    return "no error"


def _mutate(inp: dict, mutation: str) -> None:
    if mutation == "interleave_not_dividing":
        inp["interleave"] = 3
    elif mutation == "interleave_differs":
        inp["interleave"] = inp["interleave"] * 2
    elif mutation == "table_too_short":
        inp["block_table"] = inp["block_table"][:, :1].contiguous()
    elif mutation == "dtype":
        inp["k_cache"] = inp["k_cache"].to(torch.float16 if inp["q"].dtype != torch.float16 else torch.float32)
    elif mutation == "device":
        inp["block_table"] = inp["block_table"].to("meta")
    elif mutation == "seq_lens_differ":
        inp["seq_lens"] = inp["seq_lens"] + 1
    elif mutation == "uneven_heads":
        inp["q"] = inp["q"][:, :1].contiguous()
    elif mutation == "block_id_out_of_range":
        inp["block_table"] = inp["block_table"] + inp["k_cache"].shape[0]
    elif mutation == "combine_differs":
        inp["combine"] = "all_gather"
    elif mutation == "mla_without_v_head_dim":
        inp["v_head_dim"] = None
    elif mutation == "none":
        pass
    else:
        raise ValueError(mutation)


def run_case_in_subgroups(p: dict, combines: list[str]) -> dict:
    """World 4 split into DCP groups {0, 1} and {2, 3} (like DCP2 inside TP4): each pair runs case
    ``p`` (world 2) over its own group, passed to the op as a ProcessGroup (travels by name)."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    g = groups[dist.get_rank() // 2]
    world, rank = dist.get_world_size(g), dist.get_rank(g)
    inp = local_inputs(p, world, rank)
    res = {}
    for cmb in combines:
        out, lse = cpattn.dcp_decode_attention(
            inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], group=g,
            query_start_loc=inp["query_start_loc"], interleave=inp["interleave"], v_head_dim=inp["v_head_dim"],
            heads=inp["heads"], return_lse=True, combine=cmb)
        res[cmb] = (out, lse, [])
    for x in groups:
        dist.destroy_process_group(x)
    return res
