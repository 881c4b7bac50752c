"""Rank-side helpers for the plan/run tests (module-level so GlooWorld pickles them by reference).

DCP: one :class:`cpattn.DcpDecodePlan` serves several steps (each a case of ``_dcp_ranks``:
other lengths, batch sizes and query counts), two "layers" per step, with ``pad`` padding rows;
each layer is also run through the one-call op for comparison. PCP: one
:class:`cpattn.PcpPrefillPlan` over several batches, likewise. ``guard=True`` runs every ``run``
with the host-sync calls patched to raise (tests/_sync_guard.py).
"""
from __future__ import annotations

import contextlib

import torch

import cpattn
from cpattn import comm
from cpattn.testing import gloo as G
from _dcp_ranks import DTYPES, local_inputs
from _sync_guard import forbid_host_syncs


def dcp_plan_for(steps: list[dict], pad: int, combine=None, backend=None):
    """The plan every rank builds for ``steps`` (max sizes over the steps, plus ``pad`` rows)."""
    p0 = steps[0]
    world = comm.world_size()
    ins = [local_inputs(p, world, comm.rank()) for p in steps]
    return cpattn.DcpDecodePlan(
        None, num_heads=p0["hq"], num_kv_heads=p0["hkv"], head_dim=p0["dqk"], block_size=p0["bs"],
        v_head_dim=p0["dv"], mla=p0["mla"], interleave=p0["il"], heads=p0["heads"],
        combine=combine, max_num_seqs=max(len(p["lens"]) for p in steps),
        max_num_tokens=max(sum(p["nq"]) for p in steps) + pad,
        max_blocks_per_seq=max(i["block_table"].shape[1] for i in ins), dtype=DTYPES[p0["dtype"]],
        device="cpu", backend=backend), ins


def dcp_steps(steps: list[dict], pad: int, combine=None, guard: bool = False, backend=None) -> list:
    """Per step and layer: ``(out, lse, one_call_out, one_call_lse)`` on this rank (padded rows included
    in ``out``/``lse``)."""
    plan, ins = dcp_plan_for(steps, pad, combine, backend)
    res = []
    g = torch.Generator().manual_seed(comm.rank() + 77)
    for p, inp in zip(steps, ins):
        plan.plan(inp["seq_lens"], inp["block_table"], inp["query_start_loc"])
        layers = []
        for layer in range(2):
            q = inp["q"] * (1.0 if layer == 0 else 0.5)
            qp = torch.cat([q, torch.randn(pad, *q.shape[1:], generator=g).to(q.dtype)]) if pad else q
            with forbid_host_syncs() if guard else contextlib.nullcontext():
                out, lse = plan.run(qp, inp["k_cache"], inp["v_cache"], return_lse=True)
            o1, l1 = cpattn.dcp_decode_attention(
                q, inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], group=None,
                query_start_loc=inp["query_start_loc"], interleave=inp["interleave"], v_head_dim=inp["v_head_dim"],
                heads=inp["heads"], combine=plan.config.combine, return_lse=True, backend=backend)
            layers.append((out, lse, o1, l1))
        res.append(layers)
    return res


def pcp_steps(batches: list[dict], method: str, guard: bool = False, backend=None) -> list:
    """Per batch: ``(index, out, lse, one_call_out, one_call_lse, restored)`` on this rank."""
    from pcp_ranks import make_batch, make_context_batch
    from cpattn import layout

    b0 = batches[0]
    pp = cpattn.PcpPrefillPlan(None, method=method, causal=b0["causal"], backend=backend)
    res = []
    for b in batches:
        ctx = None
        if b.get("ctx"):
            q, k, v, cu, kc, vc = make_context_batch(b["seed"], b["lens"], b["ctx"], b["hq"], b["hkv"], b["dqk"],
                                                     b["dv"], DTYPES[b["dtype"]], b.get("mla", False))
            sh = layout.shard_kv(kc, vc, torch.tensor(b["ctx"], dtype=torch.int32), world_size=G.WORLD,
                                 block_size=4, interleave=b.get("il", 1), spare_blocks=1,
                                 generator=torch.Generator().manual_seed(b["seed"]), fill=float("nan"))[G.RANK]
            ctx = cpattn.PcpContext(sh.k_cache, sh.v_cache, sh.block_table,
                                    torch.tensor(b["ctx"], dtype=torch.int32), b.get("il", 1))
        else:
            q, k, v, cu = make_batch(b["seed"], b["lens"], b["hq"], b["hkv"], b["dqk"], b["dv"], DTYPES[b["dtype"]])
        pp.plan(cu, context=ctx)
        i = pp.index
        assert torch.equal(i, cpattn.pcp_partition(cu, G.WORLD, G.RANK).index)
        with forbid_host_syncs() if guard else contextlib.nullcontext():
            out, lse = pp.run(q[i], k[i], v[i], return_lse=True)
        o1, l1 = cpattn.pcp_ring_prefill(q[i], k[i], v[i], cu, group=None, causal=b0["causal"], method=method,
                                         return_lse=True, context=ctx, backend=backend)
        res.append((i, out, lse, o1, l1, pp.restore(out)))
    return res


def compiled_two_layers(compiler: str, mla: bool = False, heads: str = "replicated") -> dict:
    """torch.compile(fullgraph=True) of a two-layer function calling DcpDecodePlan.run and the
    all-gather PcpPrefillPlan.run; two steps (other lengths, same padded sizes), the second under
    ``set_stance("fail_on_recompile")``. Returns the largest differences from eager runs."""
    n, r = comm.world_size(), comm.rank()
    g = torch.Generator().manual_seed(5)  # the same on every rank: same queries, same cache values
    hq, hkv, d, dv, bs, nb, tp = 4 * n if heads == "sharded" else 4, 2, 8, 8, 4, 48, 6
    if mla:
        hkv, d = 1, 12
    plan = cpattn.DcpDecodePlan(None, num_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, v_head_dim=dv,
                                mla=mla, heads=heads, max_num_seqs=4, max_num_tokens=tp, max_blocks_per_seq=10,
                                dtype=torch.float32, device="cpu")
    hin = plan.config.heads_in
    caches = [(torch.randn(nb, bs, hkv, d, generator=g), None if mla else torch.randn(nb, bs, hkv, dv, generator=g))
              for _ in range(2)]
    w = torch.randn(hq * dv, hin * d, generator=g) * 0.2  # "projection" from one layer's output to the next q

    def two_layers(q, c1k, c1v, c2k, c2v):
        o = plan.run(q, c1k, c1v)
        q2 = (o.reshape(o.shape[0], -1) @ w[: o.shape[1] * dv]).view(q.shape) if heads == "replicated" else q * 0.5
        return plan.run(q2, c2k, c2v) + 1

    compiled = torch.compile(two_layers, fullgraph=True, backend=compiler)
    res = {}
    steps = [([9, 30, 2], [1, 2, 1]), ([17, 5, 11, 40], [1, 1, 1, 1])]
    for i, (lens, nq) in enumerate(steps):
        table = torch.randperm(nb, generator=g)[: len(lens) * 10].view(len(lens), 10).to(torch.int32)
        qsl = torch.tensor([0] + nq).cumsum(0).to(torch.int32)
        plan.plan(torch.tensor(lens, dtype=torch.int32), table, qsl)
        q = torch.randn(tp, hin, d, generator=g)
        args = (q, caches[0][0], caches[0][1], caches[1][0], caches[1][1])
        want = two_layers(*args)
        if i == 0:
            got = compiled(*args)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled(*args)
        res[f"dcp step {i}"] = float((got - want).abs().max())
    pp = cpattn.PcpPrefillPlan(None, method="allgather")

    def two_layers_pcp(q, k, v):
        o = pp.run(q, k, v)
        return pp.run(o * 0.5 + q, k * 0.5, v)

    compiled_pcp = torch.compile(two_layers_pcp, fullgraph=True, backend=compiler)
    for i, lens in enumerate(([40, 8, 16], [4, 52, 8])):  # multiples of 2N: the same row count per rank
        cu = torch.tensor([0] + lens).cumsum(0)
        pp.plan(cu)
        t = pp.num_tokens
        q, k, v = torch.randn(t, 4, 16, generator=g), torch.randn(t, 2, 16, generator=g), torch.randn(t, 2, 16, generator=g)
        want = two_layers_pcp(q, k, v)
        if i == 0:
            got = compiled_pcp(q, k, v)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled_pcp(q, k, v)
        res[f"pcp step {i}"] = float((got - want).abs().max())
    return res


def kernel_storages(workspace) -> list[int]:
    """Storage addresses of the local kernel's scratch kept in a plan's workspace."""
    return sorted(s.data_ptr() for s in workspace.kernel_storages())


def dcp_allocations_all(steps: list[dict], combines, backend=None) -> dict:
    """:func:`dcp_allocations` for each combine, with and without static bounds (one world)."""
    return {(c, static): dcp_allocations(steps, c, static, backend) for c in combines for static in (True, False)}


def dcp_allocations(steps: list[dict], combine, static: bool, backend=None) -> dict:
    """One plan over ``steps``, each run with ``q`` padded to ``max_num_tokens`` rows: per step, the
    sizes ``_execute`` (run's implementation) allocated, the collectives' output buffers (whether
    each lay in the plan's workspace), and whether the kernel's reserved scratch stayed in place."""
    from _alloc_audit import collective_outputs, fresh_allocations, inside

    plan, ins = dcp_plan_for(steps, 2, combine, backend)
    plan.static_bounds = static
    ws = plan.workspace
    reserved = kernel_storages(ws)
    res = {"steps": [], "reserved": reserved, "workspace_bytes": ws.nbytes, "kernel_bytes": ws.kernel_nbytes()}
    for p, inp in zip(steps, ins):
        plan.plan(inp["seq_lens"], inp["block_table"], inp["query_start_loc"])
        q = inp["q"]
        # static bounds: the padded bucket (max_num_tokens rows); otherwise one padding row
        Tp = plan.config.max_num_tokens if static else q.shape[0] + 1
        qp = torch.cat([q, torch.zeros(Tp - q.shape[0], *q.shape[1:], dtype=q.dtype)])
        plan._execute(qp, inp["k_cache"], inp["v_cache"])  # a first call may fill lazily-made scratch
        with collective_outputs() as colls, fresh_allocations() as fresh:
            out, lse = plan._execute(qp, inp["k_cache"], inp["v_cache"])
        res["steps"].append({
            "fresh": sorted(n for _, n in fresh), "fresh_ops": sorted(fresh, key=lambda x: -x[1])[:8],
            "collectives": [(name, o is not None and inside(o, ws.buffers.values())) for name, o in colls],
            "kernel_storages": kernel_storages(ws), "out_bytes": out.numel() * out.element_size(),
            "aliases_workspace": any(inside(t, ws.buffers.values()) or inside(t, ws.kernel_storages())
                                     for t in (out, lse)),
            "T": int(sum(p["nq"]))})
    return res
