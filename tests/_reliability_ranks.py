"""Rank-side functions for tests/test_reliability.py (module-level: GlooWorld pickles them by
reference), and a bare fault harness (``fault_worker``) whose ranks may exit or never call."""
from __future__ import annotations

import datetime
import json
import os
import time
from unittest import mock

import torch
import torch.distributed as dist

import cpattn
from cpattn import comm
from cpattn.testing import gloo as G
from _dcp_ranks import local_inputs

P = {"seed": 2, "bs": 4, "il": 1, "mla": False, "heads": "replicated", "hq": 4, "hkv": 2, "dqk": 8, "dv": 8,
     "lens": [9, 30, 2], "nq": [1, 2, 1], "dtype": "float32"}


def _dcp(inp, **kw):
    args = dict(group=None, query_start_loc=inp["query_start_loc"], interleave=inp["interleave"],
                v_head_dim=inp["v_head_dim"], heads=inp["heads"])
    args.update(kw)
    q = args.pop("q", inp["q"])
    seq_lens = args.pop("seq_lens", inp["seq_lens"])
    return cpattn.dcp_decode_attention(q, inp["k_cache"], inp["v_cache"], inp["block_table"], seq_lens, **args)


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def dcp_bad_then_good(kind: str) -> list:
    """Call 1: ``kind`` spoils rank 1's arguments (every rank must raise); call 2: a good call on
    every rank (must be right). Returns both outcomes and the good call's output."""
    inp = local_inputs({**P, "world": G.WORLD}, G.WORLD, G.RANK)
    bad = {}
    if G.RANK == 1:
        bad = {"interleave_float": dict(interleave=1.0), "heads_none": dict(heads=None),
               "q_list": dict(q=inp["q"].tolist()), "group_str": dict(group="default"),
               "seq_lens_meta": dict(seq_lens=inp["seq_lens"].to("meta")),
               "all_meta": "all_meta", "absurd_seq_lens": dict(seq_lens=torch.tensor([2**45, 30, 2], dtype=torch.int64)),
               "backend_differs": dict(backend="reference"), "heads_differ": dict(heads="sharded", combine="all_gather"),
               "no_heads": dict(q=inp["q"][:, :0])}[kind]
    if kind == "no_heads":
        bad = dict(q=inp["q"][:, :0])  # every rank: Hq = 0
    first = []
    t0 = time.monotonic()
    if bad == "all_meta":
        meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        first = _outcome(lambda: _dcp(meta))
    else:
        first = _outcome(lambda: _dcp(inp, **bad))
    took = time.monotonic() - t0
    out = _dcp(inp)
    return [first, took, out]


def pcp_bad_then_good(kind: str, method: str) -> list:
    from pcp_ranks import make_batch

    q, k, v, cu = make_batch(1, [37, 5, 64], 4, 2, 16, 8, torch.float32)
    i = cpattn.pcp_partition(cu, G.WORLD, G.RANK).index
    q, k, v = q[i], k[i], v[i]
    kw = dict(group=None, method=method)
    cub, good = cu, (q, k, v)
    if G.RANK == 1:
        if kind == "group_str":
            kw["group"] = "default"
        elif kind == "cu_meta":
            cub = cu.to("meta")
        elif kind == "all_meta":
            q, k, v, cub = q.to("meta"), k.to("meta"), v.to("meta"), cu.to("meta")
        elif kind == "absurd_cu":
            cub = torch.tensor([0, 2**45], dtype=torch.int64)
        elif kind == "method_int":
            kw["method"] = 1
    t0 = time.monotonic()
    first = _outcome(lambda: cpattn.pcp_ring_prefill(q, k, v, cub, **kw))
    took = time.monotonic() - t0
    return [first, took, cpattn.pcp_ring_prefill(*good, cu, group=None, method=method)]


def plan_bad_then_good(kind: str) -> list:
    """Plans: a bad constructor argument or plan() input on rank 1, then good ones everywhere."""
    inp = local_inputs({**P, "world": G.WORLD}, G.WORLD, G.RANK)
    ok = dict(num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, max_num_seqs=4, max_num_tokens=8,
              max_blocks_per_seq=inp["block_table"].shape[1], dtype=torch.float32, device="cpu")
    bad, seq_lens, cu = {}, inp["seq_lens"], torch.tensor([0, 30, 50])
    if G.RANK == 1:
        if kind == "interleave_float":
            bad = dict(interleave=1.0)
        elif kind == "heads_none":
            bad = dict(heads=None)
        elif kind == "dtype_str":
            bad = dict(dtype="float32")
        elif kind == "group_str":
            bad = dict(group="default")
        elif kind == "seq_lens_meta":
            seq_lens = seq_lens.to("meta")
        elif kind == "absurd_max_tokens":  # buffers that cannot be allocated
            bad = dict(max_num_tokens=2**50)
        elif kind == "absurd_seq_lens":
            seq_lens = torch.tensor([2**45, 30, 2])
        elif kind == "absurd_cu":
            cu = torch.tensor([0, 2**45])
        elif kind == "cu_meta":
            cu = cu.to("meta")
    group = bad.pop("group", None)
    outs = []
    t0 = time.monotonic()
    outs.append(_outcome(lambda: cpattn.DcpDecodePlan(group, **{**ok, **bad})))
    plan = cpattn.DcpDecodePlan(None, **ok)
    outs.append(_outcome(lambda: plan.plan(seq_lens, inp["block_table"], inp["query_start_loc"])))
    pp = cpattn.PcpPrefillPlan(None, method="allgather")
    outs.append(_outcome(lambda: pp.plan(cu)))
    took = time.monotonic() - t0
    plan.plan(inp["seq_lens"], inp["block_table"], inp["query_start_loc"])
    return [outs, took, plan.run(inp["q"], inp["k_cache"], inp["v_cache"])]


def out_of_step() -> list:
    """Rank 1's first call fails after taking its call number but before the agreement (as any
    locally abandoned call would); the ranks' next calls must not pair up: every rank raises.
    The call after that is in step again."""
    inp = local_inputs({**P, "world": G.WORLD}, G.WORLD, G.RANK)
    res = []
    if G.RANK == 1:
        with mock.patch.object(comm, "agree", side_effect=RuntimeError("local failure before the agreement")):
            res.append(_outcome(lambda: _dcp(inp)))
    res.append(_outcome(lambda: _dcp(inp)))
    res.append(_outcome(lambda: _dcp(inp)))
    return res


def destroyed_group() -> list:
    g = dist.new_group(list(range(G.WORLD)))
    name = g.group_name
    dist.destroy_process_group(g)
    inp = local_inputs({**P, "world": G.WORLD}, G.WORLD, G.RANK)
    from pcp_ranks import make_batch

    q, k, v, cu = make_batch(1, [8], 2, 1, 16, 16, torch.float32)
    i = cpattn.pcp_partition(cu, G.WORLD, G.RANK).index
    return [name,
            _outcome(lambda: _dcp(inp, group=g)),
            _outcome(lambda: cpattn.pcp_ring_prefill(q[i], k[i], v[i], cu, group=g)),
            _outcome(lambda: cpattn.DcpDecodePlan(g, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4,
                                                  max_num_seqs=4, max_blocks_per_seq=8, dtype=torch.float32,
                                                  device="cpu")),
            _outcome(lambda: cpattn.PcpPrefillPlan(g))]


# ------------------------------------------------------------------ faults (bare processes)


def fault_worker(rank: int, world: int, port: int, scenario: str, path: str, timeout: float) -> None:
    """One rank of a fault scenario; rank 0 writes what happened to it (error type, message,
    seconds) to ``path``. Rank 1 misbehaves: ``never_calls`` (sleeps past the timeout),
    ``exits`` (leaves the process), ``raises_in_dcp_run`` / ``raises_in_pcp_ring`` (its run()
    raises locally, then it sleeps)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    G.RANK, G.WORLD = rank, world
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    inp = local_inputs({**P, "world": world}, world, rank)
    plan = None
    if scenario in ("raises_in_dcp_run",):
        plan = cpattn.DcpDecodePlan(None, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, max_num_seqs=4,
                                    max_num_tokens=8, max_blocks_per_seq=inp["block_table"].shape[1],
                                    dtype=torch.float32, device="cpu")
        plan.plan(inp["seq_lens"], inp["block_table"], inp["query_start_loc"])
    pp = None
    if scenario == "raises_in_pcp_ring":
        from pcp_ranks import make_batch

        qq, kk, vv, cu = make_batch(1, [64], 4, 2, 16, 16, torch.float32)
        pp = cpattn.PcpPrefillPlan(None, method="ring")
        pp.plan(cu)
        i = pp.index
        qq, kk, vv = qq[i], kk[i], vv[i]
    if rank == 1:
        if scenario == "exits":
            os._exit(3)
        if scenario == "raises_in_dcp_run":
            try:
                plan.run(inp["q"][:, :1], inp["k_cache"], inp["v_cache"])
            except ValueError:
                pass
        if scenario == "raises_in_pcp_ring":
            try:
                pp.run(qq[:-1], kk, vv)
            except ValueError:
                pass
        time.sleep(3 * timeout)
        os._exit(0)
    t0 = time.monotonic()
    try:
        if scenario == "raises_in_dcp_run":
            plan.run(inp["q"], inp["k_cache"], inp["v_cache"])
        elif scenario == "raises_in_pcp_ring":
            pp.run(qq, kk, vv)
        else:
            _dcp(inp)
        res = {"error": None}
    except Exception as exc:
        res = {"error": type(exc).__name__, "message": str(exc)[:500]}
    res["seconds"] = time.monotonic() - t0
    with open(path, "w") as f:
        json.dump(res, f)
    os._exit(0)
