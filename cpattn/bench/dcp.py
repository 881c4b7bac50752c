"""``cpattn-bench dcp``: DCP decode on real gloo ranks: local attention, combine, bytes sent.

For each shape (GQA ``Hq=32, Hkv=8, D=128``; MLA ``Hq=16``, latent ``512 + 64``, V ``512``) and
world size, every rank builds its own shard of a ``--batch`` x ``--context`` KV cache (random
values, the real per-rank lengths of the DCP layout) and reports:

* ``local_ms``: the local paged attention over its shard, timed one rank at a time (the others
  wait at a barrier) so that ranks sharing this machine's cores do not disturb each other;
  ``1dev_ms``: the same kernel over the whole unsharded cache on one rank (no DCP), the figure
  DCP divides;
* ``combine_ms``: each combine strategy, all ranks together (max over ranks of the median);
  ``q_gather_ms``: the extra query all-gather of ``heads="sharded"``;
* ``agree_ms``: the input agreement every call starts with (one small all-gather of metadata
  fingerprints, :func:`cpattn.comm.agree`), the price of raising on every rank instead of hanging;
* ``bytes``: bytes one rank sends to combine (recorded from the collectives run), with the
  formula's value (:func:`cpattn.dcp_combine.expected_bytes`) beside it.

``--layers L`` (default 32) adds the serving view, one row per head mode: a step of ``L`` layers
through :class:`cpattn.DcpDecodePlan` (one ``plan()`` then ``L`` ``run()`` calls) against ``L``
calls of the one-call op (each validating, agreeing and computing the metadata again).
``plan_ms`` is one ``plan()``; ``run_ms`` and ``op_ms`` are per layer (step time / L, the slowest
rank, best of ``--iters`` interleaved steps, so that load from other processes on a shared
machine hits both alike); ``saved`` is ``1 - step_run / step_op``.

``--check`` first runs a small case through the public op with every strategy and compares each
rank's result with the float64 reference on the unsharded cache (tolerance: 2x the error of
plain PyTorch at the same precision).
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.distributed as dist

import cpattn
from cpattn import comm, dcp_combine, layout, reference
from cpattn.backends import select
from cpattn.testing.gloo import GlooWorld

from .common import DTYPES, choice_list, int_list, json_path, nonneg_int, positive_int, print_table, write_json

SHAPES = {
    "gqa": dict(hq=32, hkv=8, dqk=128, dv=128, mla=False),
    "mla": dict(hq=16, hkv=1, dqk=576, dv=512, mla=True),
}
COLUMNS = ["shape", "world", "heads", "combine", "local_ms", "1dev_ms", "combine_ms", "q_gather_ms", "agree_ms",
           "bytes", "formula", "check"]
LAYER_COLUMNS = ["shape", "world", "heads", "combine", "layers", "plan_ms", "run_ms", "op_ms", "step_run_ms",
                 "step_op_ms", "saved"]


def _local_cache(shape: dict, context: int, batch: int, world: int, rank: int, bs: int, dtype, gen):
    n = int(layout.dcp_local_seq_lens(torch.tensor(context), world, rank))
    per_req = -(-n // bs)
    nb = max(1, batch * per_req)
    k = torch.randn(nb, bs, shape["hkv"], shape["dqk"], generator=gen, dtype=torch.float32).to(dtype)
    v = None if shape["mla"] else torch.randn(nb, bs, shape["hkv"], shape["dv"], generator=gen).to(dtype)
    table = torch.randperm(nb, generator=gen)[: batch * per_req].view(batch, per_req).to(torch.int32)
    return k, v, table, n


def _times(fn, iters: int, sync=None) -> list[float]:
    times = []
    for _ in range(iters):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _median_time(fn, iters: int, sync=None) -> float:
    return statistics.median(_times(fn, iters, sync))


def _best_time(fn, iters: int, sync=None) -> float:
    return min(_times(fn, iters, sync))


def bench_rank(shape_name: str, context: int, batch: int, dtype_name: str, bs: int, iters: int,
               combine_iters: int, baseline: bool) -> list[dict]:
    """On every rank: time this rank's local attention and every combine strategy."""
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    world, rank = comm.world_size(), comm.rank()
    gen = torch.Generator().manual_seed(1000 + rank)
    k, v, table, n = _local_cache(shape, context, batch, world, rank, bs, dtype, gen)
    q = torch.randn(batch, shape["hq"], shape["dqk"], generator=gen).to(dtype)
    kw = dict(q=q, k_cache=k, v_cache=v, block_table=table, query_start_loc=torch.arange(batch + 1),
              visible_lens=torch.full((batch,), n), scale=1 / math.sqrt(shape["dqk"]), v_head_dim=shape["dv"],
              max_query_len=1, max_kv_len=n)
    be = select("paged_attention", None, kw)
    local = 0.0
    for r in range(world):  # one rank at a time
        dist.barrier()
        if r == rank:
            be.run("paged_attention", **kw)  # warm-up
            local = _median_time(lambda: be.run("paged_attention", **kw), iters)
    out, lse = be.run("paged_attention", **kw)
    del k, v, kw
    one_dev = None
    if baseline and rank == 0:  # the whole cache on one device
        k1, v1, t1, n1 = _local_cache(shape, context, batch, 1, 0, bs, dtype, gen)
        kw1 = dict(q=q, k_cache=k1, v_cache=v1, block_table=t1, query_start_loc=torch.arange(batch + 1),
                   visible_lens=torch.full((batch,), n1), scale=1 / math.sqrt(shape["dqk"]), v_head_dim=shape["dv"],
                   max_query_len=1, max_kv_len=n1)
        be.run("paged_attention", **kw1)
        one_dev = _median_time(lambda: be.run("paged_attention", **kw1), iters)
        del k1, v1, kw1
    dist.barrier()
    fields = {"q": tuple(q.shape), "seq_lens": [context] * batch, "interleave": 1, "heads": "replicated"}
    agree = _median_time(lambda: comm.agree("bench", None, fields), combine_iters, dist.barrier)
    rows = []
    for heads in ("replicated", "sharded"):
        q_gather = None
        if heads == "sharded":
            qs = q[:, rank * (shape["hq"] // world):(rank + 1) * (shape["hq"] // world)].contiguous()
            q_gather = _median_time(lambda: dcp_combine.gather_heads(qs, None), combine_iters, dist.barrier)
        for strategy in dcp_combine.allowed(heads):
            def step():
                return dcp_combine.combine(out, lse, strategy=strategy, heads=heads)
            step()
            with dcp_combine.count_bytes() as recs:
                step()
            t = _median_time(step, combine_iters, dist.barrier)
            rows.append(dict(shape=shape_name, world=world, heads=heads, combine=strategy, local_s=local,
                             one_dev_s=one_dev, combine_s=t, q_gather_s=q_gather, agree_s=agree,
                             bytes=sum(r.bytes_sent for r in recs if r.purpose == "combine"),
                             formula=dcp_combine.expected_bytes(strategy, heads, world, batch, shape["hq"],
                                                                shape["dv"], dtype)))
    return rows


def layers_rank(shape_name: str, context: int, batch: int, dtype_name: str, bs: int, layers: int,
                steps: int) -> list[dict]:
    """On every rank: one decode step of ``layers`` layers, plan/run against the one-call op."""
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    world, rank = comm.world_size(), comm.rank()
    gen = torch.Generator().manual_seed(2000 + rank)
    k, v, table, _ = _local_cache(shape, context, batch, world, rank, bs, dtype, gen)
    q = torch.randn(batch, shape["hq"], shape["dqk"], generator=torch.Generator().manual_seed(3)).to(dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    dv = shape["dv"] if shape["mla"] else None
    rows = []
    for heads in ("replicated", "sharded"):
        s = shape["hq"] // world
        qh = q[:, rank * s:(rank + 1) * s].contiguous() if heads == "sharded" else q
        plan = cpattn.DcpDecodePlan(None, num_heads=shape["hq"], num_kv_heads=shape["hkv"], head_dim=shape["dqk"],
                                    block_size=bs, v_head_dim=shape["dv"], mla=shape["mla"], heads=heads,
                                    max_num_seqs=batch, max_blocks_per_seq=table.shape[1], dtype=dtype, device="cpu")

        def plan_only():
            plan.plan(seq_lens, table)

        def step_run():
            plan.plan(seq_lens, table)
            for _ in range(layers):
                plan.run(qh, k, v)

        def step_op():
            for _ in range(layers):
                cpattn.dcp_decode_attention(qh, k, v, table, seq_lens, group=None, v_head_dim=dv, heads=heads,
                                            combine=plan.config.combine)

        step_run()
        step_op()
        t_plan = _best_time(plan_only, max(steps, 5), dist.barrier)
        t_run, t_op = float("inf"), float("inf")
        for _ in range(steps):  # interleaved, best of each: load from other processes hits both alike
            t_run = min(t_run, _best_time(step_run, 1, dist.barrier))
            t_op = min(t_op, _best_time(step_op, 1, dist.barrier))
        rows.append(dict(heads=heads, combine=plan.config.combine, plan_s=t_plan, step_run_s=t_run, step_op_s=t_op))
    return rows


def bench_layers(shapes: list[str], worlds: list[int], context: int, batch: int, dtype: str, bs: int, layers: int,
                 steps: int) -> list[dict]:
    rows = []
    for world in worlds:
        with GlooWorld(world, timeout=1800, threads=1) as w:
            for shape in shapes:
                per_rank = w.run(layers_rank, shape, context, batch, dtype, bs, layers, steps)
                for i, row in enumerate(per_rank[0]):
                    rk = [pr[i] for pr in per_rank]
                    run_s = max(r["step_run_s"] for r in rk)
                    op_s = max(r["step_op_s"] for r in rk)
                    rows.append(dict(shape=shape, world=world, heads=row["heads"], combine=row["combine"],
                                     layers=layers, plan_ms=max(r["plan_s"] for r in rk) * 1e3,
                                     run_ms=run_s / layers * 1e3, op_ms=op_s / layers * 1e3, step_run_ms=run_s * 1e3,
                                     step_op_ms=op_s * 1e3, saved=f"{(1 - run_s / op_s) * 100:.0f}%"))
    return rows


def check_rank(dtype_name: str) -> list[dict]:
    """On every rank: small GQA and MLA cases through the public op, every heads mode and
    strategy, against the float64 reference on the unsharded cache."""
    world, rank = comm.world_size(), comm.rank()
    dtype = DTYPES[dtype_name]
    res = []
    for name, sh in {"gqa": dict(hq=4 * world, hkv=2, dqk=16, dv=16, mla=False),
                     "mla": dict(hq=2 * world, hkv=1, dqk=24, dv=16, mla=True)}.items():
        g = torch.Generator().manual_seed(7)
        lens, nq = [1, 5, 33, 70], [1, 2, 1, 3]
        k = torch.randn(sum(lens), sh["hkv"], sh["dqk"], generator=g).to(dtype)
        v = None if sh["mla"] else torch.randn(sum(lens), sh["hkv"], sh["dv"], generator=g).to(dtype)
        q = (torch.randn(sum(nq), sh["hq"], sh["dqk"], generator=g) * 2).to(dtype)
        qsl = torch.tensor([0] + nq).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        vv = k[..., :sh["dv"]] if sh["mla"] else v
        okw = dict(cu_seqlens_q=qsl.long(), cu_seqlens_k=torch.tensor([0] + lens).cumsum(0), causal=True)
        ref_o, _ = reference.attention(q, k, vv, **okw)
        base_o, _ = reference.attention(q, k, vv, dtype=dtype, **okw)
        for il in (1, 4):
            shard = layout.shard_kv(k, v, seq_lens, world_size=world, block_size=4, interleave=il)[rank]
            for heads in ("replicated", "sharded"):
                s = sh["hq"] // world if heads == "sharded" else sh["hq"]
                h = slice(rank * s, (rank + 1) * s) if heads == "sharded" else slice(None)
                for strategy in dcp_combine.allowed(heads):
                    out = cpattn.dcp_decode_attention(
                        q[:, h].contiguous(), shard.k_cache, shard.v_cache, shard.block_table, seq_lens, group=None,
                        query_start_loc=qsl, interleave=il, v_head_dim=sh["dv"] if sh["mla"] else None, heads=heads,
                        combine=strategy)
                    err = (out.double() - ref_o[:, h]).abs().max().item()
                    tol = 2 * max((base_o[:, h] - ref_o[:, h]).abs().max().item(),
                                  torch.finfo(dtype).eps * max(1.0, ref_o.abs().max().item()))
                    res.append(dict(shape=name, heads=heads, combine=strategy, interleave=il, err=err, ok=err <= tol))
    return res


def bench(shapes: list[str], worlds: list[int], context: int, batch: int, dtype: str, bs: int, iters: int,
          combine_iters: int, check: bool, baseline: bool = True) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for world in worlds:
        with GlooWorld(world, timeout=1800, threads=1) as w:
            checks = {}
            if check:
                for per_rank in w.run(check_rank, dtype):
                    for c in per_rank:
                        key = (c["shape"], c["heads"], c["combine"])
                        checks.setdefault(key, []).append(c)
                ok = ok and all(c["ok"] for cs in checks.values() for c in cs)
            for shape in shapes:
                per_rank = w.run(bench_rank, shape, context, batch, dtype, bs, iters, combine_iters, baseline)
                for i, row in enumerate(per_rank[0]):
                    rk = [pr[i] for pr in per_rank]
                    cs = checks.get((shape, row["heads"], row["combine"]))
                    rows.append(dict(
                        shape=shape, world=world, heads=row["heads"], combine=row["combine"],
                        local_ms="/".join(f"{r['local_s'] * 1e3:.0f}" for r in rk),
                        **{"1dev_ms": row["one_dev_s"] * 1e3 if row["one_dev_s"] else "-"},
                        combine_ms=max(r["combine_s"] for r in rk) * 1e3,
                        q_gather_ms=max(r["q_gather_s"] for r in rk) * 1e3 if row["q_gather_s"] is not None else "-",
                        agree_ms=max(r["agree_s"] for r in rk) * 1e3,
                        bytes=row["bytes"], formula=row["formula"],
                        check="-" if cs is None else ("ok" if all(c["ok"] for c in cs) else "FAIL") + f" ({max(c['err'] for c in cs):.1e})",
                        per_rank=rk))
                    ok = ok and all(r["bytes"] == r["formula"] for r in rk)
    return rows, ok


def register(subs) -> None:
    p = subs.add_parser("dcp", help="DCP decode on gloo ranks: local attention, combine strategies, bytes sent")
    p.add_argument("--context", type=positive_int, default=32768, help="tokens per request (global)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--world", type=int_list, default="2,4", help="comma list of world sizes")
    p.add_argument("--shapes", type=choice_list(SHAPES), default="gqa,mla", help="comma list of gqa,mla")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--block-size", type=positive_int, default=64)
    p.add_argument("--iters", type=positive_int, default=3, help="local-attention timing iterations")
    p.add_argument("--combine-iters", type=positive_int, default=50)
    p.add_argument("--no-baseline", action="store_true", help="skip the one-device (no DCP) timing")
    p.add_argument("--layers", type=nonneg_int, default=32,
                   help="layers per step for the plan/run vs one-call table (0: skip it; default 32)")
    p.add_argument("--layer-context", type=positive_int, default=None,
                   help="tokens per request for that table (default: --context)")
    p.add_argument("--check", action="store_true", help="check a small case against the float64 reference first")
    p.add_argument("--json", metavar="PATH", type=json_path, help="also write the results as JSON")
    p.set_defaults(func=run, validate=_validate)


def _validate(args) -> str | None:
    """Checks across arguments (cli.main turns a message into an argparse error)."""
    for name in args.shapes:
        hq = SHAPES[name]["hq"]
        bad = [w for w in args.world if hq % w]
        if bad:  # heads="sharded" splits the query heads over the ranks
            return f"--world {','.join(map(str, bad))}: the {name} shape's {hq} query heads must divide by the world size"
    return None


def _print(rows, title):
    print("local_ms: per rank (rank 0/1/...), ranks timed one at a time, 1 thread each; combine_ms: max over "
          "ranks of the median; bytes: sent per rank by the combine")
    print_table(rows, COLUMNS, title)


def run(args) -> int:
    rows, ok = bench(args.shapes, args.world, args.context, args.batch,
                     args.dtype, args.block_size, args.iters, args.combine_iters, args.check, not args.no_baseline)
    _print(rows, f"dcp_decode_attention: batch {args.batch} x {args.context} tokens, {args.dtype}, "
                 f"block {args.block_size}")
    lrows = []
    if args.layers > 0:
        ctx = args.layer_context or args.context
        lrows = bench_layers(args.shapes, args.world, ctx, args.batch,
                             args.dtype, args.block_size, args.layers, args.iters)
        print_table(lrows, LAYER_COLUMNS, f"per layer: DcpDecodePlan (plan once, run x{args.layers}) vs "
                                          f"dcp_decode_attention x{args.layers}; batch {args.batch} x {ctx} tokens")
    if args.json:
        write_json(args.json, {"op": "dcp", "args": vars(args) | {"func": None, "validate": None}, "rows": rows,
                               "layer_rows": lrows})
    if not ok:
        print("SOME CHECKS FAILED (reference check or bytes != formula)")
    return 0 if ok else 1


def tour() -> bool:
    rows, ok = bench(["gqa", "mla"], [2], context=2048, batch=2, dtype="bfloat16", bs=64, iters=1, combine_iters=3,
                     check=True)
    _print(rows, "dcp (tour: world 2, checked against the float64 reference)")
    lrows = bench_layers(["gqa"], [2], context=2048, batch=2, dtype="bfloat16", bs=64, layers=4, steps=1)
    print_table(lrows, LAYER_COLUMNS, "dcp per layer (tour: plan once + run x4 vs the one-call op x4)")
    return ok
