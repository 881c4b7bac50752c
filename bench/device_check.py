"""Device check: correctness and timings of every Triton kernel on one GPU, in one command.

    python bench/device_check.py                  # one CUDA GPU (H100/H200): about 5-8 minutes
    python bench/device_check.py --dry-run        # tiny sizes, CPU, Triton interpreter (CI)

Writes ``--json`` (default device_check.json) and ``--md`` (default device_check.md) and prints
the markdown. Exit code 0 when every correctness row passes, 1 otherwise (timings never fail).

Correctness: each Triton kernel (merge, paged decode, varlen prefill) against
``cpattn.reference`` computed in float64 on the same device (chunked over heads and query rows
where a whole-problem float64 copy would not fit), judged by the project's tolerance rule
(:mod:`cpattn.testing.tolerance`: at most 2x the error of plain PyTorch at the input precision).
Shapes (full run): merge 8-way T=16k H=32 D=128; paged decode GQA 32/8 D128 and MLA 576/512
(16 and 128 heads) at 32k context, batch 8 and 64 (float64 check on a few requests); varlen
causal prefill blocks of 8k and 16k tokens, GQA 32/8 D128 (check on the first and last rows).

Timings (median of CUDA-event timed runs), each against a ceiling measured in the same run:
merge and paged decode as a fraction of the device's copy bandwidth for the same bytes (goals
0.85 and 0.75), varlen prefill as a fraction of ``scaled_dot_product_attention``'s throughput with
the flash backend on the same tokens (goal 0.80); the eager PyTorch formula and cpattn's
``pytorch`` backend are further rows.

Plan/run under a CUDA graph: when ``cpattn.DcpDecodePlan`` exists, ``run`` is captured in a
``torch.cuda.CUDAGraph`` (with ``torch.cuda.set_sync_debug_mode("error")`` around it: no host
sync may happen), replayed after ``plan()`` with new lengths, and compared with eager ``run``
and the float64 reference; otherwise the row says "skipped: no plan/run API". Beside it, what
one eager ``run`` allocates (``torch.cuda.memory_stats``: count and bytes), at two steps'
lengths: they must be equal (nothing sized by the data). At world size 1 on the Triton kernel
this covers the step metadata and the kernel, not the combine's buffers.

``--dry-run`` runs the same code at tiny sizes on CPU with ``TRITON_INTERPRET=1`` (set before
the kernels are imported) so the script cannot rot between GPU runs; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

SIZES = {
    "full": dict(
        merge=[dict(ways=8, T=16384, H=32, D=128)],
        paged=[dict(name="GQA 32/8 D128", hq=32, hkv=8, dqk=128, dv=128, ctx=32768, batch=b, bs=64) for b in (8, 64)]
        + [dict(name=f"MLA 576/512 H{h}", hq=h, hkv=1, dqk=576, dv=512, ctx=32768, batch=b, bs=64)
           for h in (16, 128) for b in (8, 64)],
        varlen=[dict(name="GQA 32/8 D128", hq=32, hkv=8, d=128, L=L) for L in (8192, 16384)],
        check_requests=3, check_rows=512, iters=20, eager_max_batch=8, eager_max_L=8192,
    ),
    "dry": dict(
        merge=[dict(ways=3, T=5, H=2, D=40)],
        paged=[dict(name="GQA 4/2 D24", hq=4, hkv=2, dqk=24, dv=24, ctx=37, batch=2, bs=16),
               dict(name="MLA 40/32 H4", hq=4, hkv=1, dqk=40, dv=32, ctx=21, batch=2, bs=16)],
        varlen=[dict(name="GQA 4/2 D24", hq=4, hkv=2, d=24, L=37)],
        check_requests=2, check_rows=8, iters=1, eager_max_batch=8, eager_max_L=64,
    ),
}
GOALS = {"merge": 0.85, "paged": 0.75, "varlen": 0.80}


# ----------------------------------------------------------------------------- helpers


def _timer(device):
    import torch

    def run(fn, iters):
        if device.type == "cuda":
            fn()  # warm-up (compiles); the interpreter has nothing to warm up
        if device.type == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return statistics.median(times)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return run


def _copy_gbps(nbytes, device, timer, iters):
    """Device copy bandwidth (bytes read + written per second) for a copy moving ``nbytes``."""
    import torch

    half = max(1, nbytes // 2)
    src = torch.ones(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), iters)
    return 2 * half / t / 1e9


def _row(section, **kw):
    return {"section": section, **kw}


def _guard(rows, section, label, fn):
    """Run one measurement; an exception (OOM, a missing backend) becomes an error row."""
    try:
        fn()
    except Exception as exc:  # report and go on: one bad row must not lose the others
        rows.append(_row(section, what=label, status=f"error: {type(exc).__name__}: {str(exc)[:200]}"))
        if os.environ.get("CPATTN_DEVICE_CHECK_TRACE"):
            traceback.print_exc()


# ----------------------------------------------------------------------------- merge


def run_merge(cfg, dtype, device, S, timer, out):
    import torch
    from cpattn import merge_attn_states_n, reference
    from cpattn.bench.merge import eager_merge
    from cpattn.testing.tolerance import compare

    n, T, H, D = cfg["ways"], cfg["T"], cfg["H"], cfg["D"]
    g = torch.Generator(device=device).manual_seed(0)
    outs = torch.randn(n, T, H, D, generator=g, device=device).to(dtype)
    lses = torch.randn(n, T, H, generator=g, device=device) * 3
    label = f"{n}-way T={T} H={H} D={D} {str(dtype)[6:]}"
    got = merge_attn_states_n(outs, lses, backend="triton")
    ref = reference.merge_n(list(outs), list(lses))
    base = reference.merge_n(list(outs), list(lses), dtype=dtype)
    c_o = compare(got[0], ref[0], base[0].to(dtype), dtype=dtype)
    c_l = compare(got[1], ref[1], base[1], dtype=torch.float32)
    out["correctness"].append(_row("merge", what=label, kernel="triton", ok=c_o["ok"] and c_l["ok"],
                                   out_err=c_o["err"], out_tol=c_o["tol"], lse_err=c_l["err"], lse_tol=c_l["tol"]))
    del ref, base, got
    nbytes = (n + 1) * (T * H * D * outs.element_size() + T * H * 4)
    copy = _copy_gbps(nbytes, device, timer, S["iters"])
    out["timing"].append(_row("merge", what=label, impl="device copy (ceiling)", ms=None, GBps=copy, of_ceiling=1.0))
    for impl, fn in (("triton", lambda: merge_attn_states_n(outs, lses, backend="triton")),
                     ("pytorch backend", lambda: merge_attn_states_n(outs, lses, backend="pytorch")),
                     ("eager formula", lambda: eager_merge(outs, lses))):
        def one(impl=impl, fn=fn):
            t = timer(fn, S["iters"])
            gbps = nbytes / t / 1e9
            out["timing"].append(_row("merge", what=label, impl=impl, ms=t * 1e3, GBps=gbps, of_ceiling=gbps / copy,
                                      goal=GOALS["merge"] if impl == "triton" else None))
        _guard(out["timing"], "merge", f"{label} {impl}", one)


# ----------------------------------------------------------------------------- paged decode


def _paged_inputs(cfg, dtype, device):
    import torch

    B, L, bs = cfg["batch"], cfg["ctx"], cfg["bs"]
    mla = cfg["hkv"] == 1 and cfg["dv"] < cfg["dqk"]
    per = -(-L // bs)
    nb = B * per
    g = torch.Generator(device=device).manual_seed(1)
    k_cache = torch.randn(nb, bs, cfg["hkv"], cfg["dqk"], generator=g, device=device).to(dtype)
    v_cache = None if mla else torch.randn(nb, bs, cfg["hkv"], cfg["dv"], generator=g, device=device).to(dtype)
    table = torch.randperm(nb, generator=g, device=device).view(B, per).to(torch.int32)
    q = torch.randn(B, cfg["hq"], cfg["dqk"], generator=g, device=device).to(dtype)
    kw = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table,
              query_start_loc=torch.arange(B + 1, device=device, dtype=torch.int32),
              visible_lens=torch.full((B,), L, device=device, dtype=torch.int32),
              scale=1 / math.sqrt(cfg["dqk"]), v_head_dim=cfg["dv"], max_query_len=1, max_kv_len=L)
    return kw


def _unpaged(kw, b, L):
    """Request ``b``'s keys and values in order: ``[L, Hkv, D]``."""
    k_cache, v_cache, table = kw["k_cache"], kw["v_cache"], kw["block_table"]
    bs = k_cache.shape[1]
    k = k_cache[table[b].long()].flatten(0, 1)[:L]
    v = k[..., : kw["v_head_dim"]] if v_cache is None else v_cache[table[b].long()].flatten(0, 1)[:L]
    return k, v


def _ref_rows(q, k, v, scale, dtype, q_pos=None, k_pos=None, causal=False, head_chunk=16):
    """``cpattn.reference.attention`` over one sequence, a KV head and a chunk of its query heads at
    a time (the float64 copy of K repeated over a whole head group would not fit)."""
    import torch
    from cpattn import reference

    T, hq, _ = q.shape
    hkv = k.shape[1]
    G = hq // hkv
    o = torch.empty(T, hq, v.shape[-1], dtype=dtype, device=q.device)
    lse = torch.empty(T, hq, dtype=dtype, device=q.device)
    for h in range(hkv):
        for g0 in range(0, G, head_chunk):
            sl = slice(h * G + g0, h * G + min(G, g0 + head_chunk))
            ro, rl = reference.attention(q[:, sl], k[:, h:h + 1], v[:, h:h + 1], scale=scale, causal=causal,
                                         q_positions=q_pos, k_positions=k_pos, dtype=dtype)
            o[:, sl], lse[:, sl] = ro, rl
    return o, lse


def eager_paged(kw):
    """The usual formula: gather the pages, repeat KV over the group, float32 softmax."""
    import torch

    q, L = kw["q"], kw["max_kv_len"]
    B, hq, D = q.shape
    k = kw["k_cache"][kw["block_table"].long()].flatten(1, 2)[:, :L]  # [B, L, Hkv, D]
    v = k[..., : kw["v_head_dim"]] if kw["v_cache"] is None else kw["v_cache"][kw["block_table"].long()].flatten(1, 2)[:, :L]
    G = hq // k.shape[2]
    s = torch.einsum("bhd,blhd->bhl", q.float(), k.float().repeat_interleave(G, dim=2)) * kw["scale"]
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhl,blhd->bhd", p, v.float().repeat_interleave(G, dim=2)).to(q.dtype)


def run_paged(cfg, dtype, device, S, timer, out):
    import torch
    from cpattn.backends import get_backend
    from cpattn.testing.tolerance import compare

    kw = _paged_inputs(cfg, dtype, device)
    label = f"{cfg['name']} ctx={cfg['ctx']} B={cfg['batch']} {str(dtype)[6:]}"
    tri = get_backend("triton")
    o, lse = tri.run("paged_attention", **kw)
    ok, errs = True, []
    reqs = sorted({0, cfg["batch"] // 2, cfg["batch"] - 1})[: S["check_requests"]]
    for b in reqs:
        k, v = _unpaged(kw, b, cfg["ctx"])
        qb = kw["q"][b:b + 1]
        ro, rl = _ref_rows(qb, k, v, kw["scale"], torch.float64)
        bo, bl = _ref_rows(qb, k, v, kw["scale"], dtype)
        c_o = compare(o[b:b + 1], ro, bo.to(dtype), dtype=dtype)
        c_l = compare(lse[b:b + 1], rl, bl, dtype=torch.float32)
        ok = ok and c_o["ok"] and c_l["ok"]
        errs.append((c_o["err"], c_o["tol"], c_l["err"], c_l["tol"]))
    worst = max(errs, key=lambda e: e[0] / max(e[1], 1e-30))
    out["correctness"].append(_row("paged", what=label, kernel="triton", ok=ok, requests_checked=len(reqs),
                                   out_err=worst[0], out_tol=worst[1], lse_err=worst[2], lse_tol=worst[3]))
    B, L = cfg["batch"], cfg["ctx"]
    e = kw["q"].element_size()
    kv_bytes = B * L * cfg["hkv"] * (cfg["dqk"] + (0 if kw["v_cache"] is None else cfg["dv"])) * e
    copy = _copy_gbps(kv_bytes, device, timer, S["iters"])
    out["timing"].append(_row("paged", what=label, impl="device copy (ceiling)", ms=None, GBps=copy, of_ceiling=1.0))
    impls = [("triton", lambda: tri.run("paged_attention", **kw))]
    if B <= S["eager_max_batch"]:
        impls += [("pytorch backend", lambda: get_backend("pytorch").run("paged_attention", **kw)),
                  ("eager formula", lambda: eager_paged(kw))]
    for impl, fn in impls:
        def one(impl=impl, fn=fn):
            t = timer(fn, S["iters"])
            gbps = kv_bytes / t / 1e9
            out["timing"].append(_row("paged", what=label, impl=impl, ms=t * 1e3, GBps=gbps, of_ceiling=gbps / copy,
                                      goal=GOALS["paged"] if impl == "triton" else None))
        _guard(out["timing"], "paged", f"{label} {impl}", one)


# ----------------------------------------------------------------------------- varlen prefill


def run_varlen(cfg, dtype, device, S, timer, out):
    import torch
    import torch.nn.functional as F
    from cpattn.backends import get_backend
    from cpattn.testing.tolerance import compare

    L, hq, hkv, d = cfg["L"], cfg["hq"], cfg["hkv"], cfg["d"]
    g = torch.Generator(device=device).manual_seed(2)
    q = torch.randn(L, hq, d, generator=g, device=device).to(dtype)
    k = torch.randn(L, hkv, d, generator=g, device=device).to(dtype)
    v = torch.randn(L, hkv, d, generator=g, device=device).to(dtype)
    cu = torch.tensor([0, L], device=device, dtype=torch.int32)
    kw = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, q_positions=None, k_positions=None, causal=True,
              scale=1 / math.sqrt(d))
    label = f"{cfg['name']} causal L={L} {str(dtype)[6:]}"
    tri = get_backend("triton")
    o, lse = tri.run("attention", **kw)
    n = min(S["check_rows"], L)
    rows = torch.unique(torch.cat([torch.arange(n), torch.arange(L - n, L)])).to(device)
    pos = torch.arange(L, device=device)
    ro, rl = _ref_rows(q[rows], k, v, kw["scale"], torch.float64, pos[rows], pos, causal=True, head_chunk=8)
    bo, bl = _ref_rows(q[rows], k, v, kw["scale"], dtype, pos[rows], pos, causal=True, head_chunk=8)
    c_o = compare(o[rows], ro, bo.to(dtype), dtype=dtype)
    c_l = compare(lse[rows], rl, bl, dtype=torch.float32)
    out["correctness"].append(_row("varlen", what=label, kernel="triton", ok=c_o["ok"] and c_l["ok"],
                                   rows_checked=int(rows.numel()), out_err=c_o["err"], out_tol=c_o["tol"],
                                   lse_err=c_l["err"], lse_tol=c_l["tol"]))
    del ro, rl, bo, bl
    flops = 4 * hq * d * L * (L + 1) / 2  # causal: QK^T and PV over the visible half
    G = hq // hkv
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
    kh = k.repeat_interleave(G, dim=1).transpose(0, 1).unsqueeze(0)
    vh = v.repeat_interleave(G, dim=1).transpose(0, 1).unsqueeze(0)

    def sdpa():
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=kw["scale"])

    ceiling = "sdpa flash (ceiling)"
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa()
        ref_fn = sdpa_flash
    else:
        ref_fn, ceiling = sdpa, "sdpa default (no flash on CPU)"
    t_ref = timer(ref_fn, S["iters"])
    out["timing"].append(_row("varlen", what=label, impl=ceiling, ms=t_ref * 1e3, TFLOPs=flops / t_ref / 1e12,
                              of_ceiling=1.0))
    impls = [("triton", lambda: tri.run("attention", **kw)),
             ("pytorch backend", lambda: get_backend("pytorch").run("attention", **kw))]
    if L <= S["eager_max_L"]:
        impls.append(("eager formula", lambda: eager_varlen(qh, kh, vh, kw["scale"])))
    for impl, fn in impls:
        def one(impl=impl, fn=fn):
            t = timer(fn, S["iters"])
            out["timing"].append(_row("varlen", what=label, impl=impl, ms=t * 1e3, TFLOPs=flops / t / 1e12,
                                      of_ceiling=t_ref / t, goal=GOALS["varlen"] if impl == "triton" else None))
        _guard(out["timing"], "varlen", f"{label} {impl}", one)


def eager_varlen(qh, kh, vh, scale, head_chunk=8):
    """The usual formula: float32 scores with a causal mask, softmax, times V (heads in chunks)."""
    import torch

    L = qh.shape[2]
    mask = torch.ones(L, L, dtype=torch.bool, device=qh.device).tril()
    outs = []
    for h0 in range(0, qh.shape[1], head_chunk):
        s = (qh[:, h0:h0 + head_chunk].float() @ kh[:, h0:h0 + head_chunk].float().transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append((p @ vh[:, h0:h0 + head_chunk].float()).to(qh.dtype))
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------- plan/run + CUDA graph


def run_graph(device, dtype, dry, out):
    """The DCP plan/run path (world 1) captured in a CUDA graph, replayed with new lengths."""
    import torch
    import cpattn
    from cpattn.testing.tolerance import compare

    if not hasattr(cpattn, "DcpDecodePlan"):
        out["graph"] = {"status": "skipped: no plan/run API (cpattn.DcpDecodePlan does not exist in this build)"}
        return
    hq, hkv, d, bs = (4, 2, 24, 16) if dry else (32, 8, 128, 64)
    B, mb = (2, 4) if dry else (8, 512)
    nb = B * mb
    g = torch.Generator(device=device).manual_seed(3)
    k_cache = torch.randn(nb, bs, hkv, d, generator=g, device=device).to(dtype)
    v_cache = torch.randn(nb, bs, hkv, d, generator=g, device=device).to(dtype)
    table = torch.randperm(nb, generator=g, device=device).view(B, mb).to(torch.int32)
    q = torch.randn(B, hq, d, generator=g, device=device).to(dtype)
    plan = cpattn.DcpDecodePlan(None, num_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, max_num_seqs=B,
                                max_blocks_per_seq=mb, dtype=dtype, device=device, backend="triton")
    lens_a = torch.tensor([(i + 1) * mb * bs // (B + 1) for i in range(B)], dtype=torch.int32)
    lens_b = torch.tensor([mb * bs - 1 - i for i in range(B)], dtype=torch.int32)
    buf = torch.empty(B, hq, d, dtype=dtype, device=device)
    plan.plan(lens_a, table)
    if device.type == "cuda":
        plan.run(q, k_cache, v_cache, out=buf)  # warm-up: compiles the kernels
        torch.cuda.synchronize()

        def checked_run():  # a host sync inside run() raises here (torch's sync debug mode)
            torch.cuda.set_sync_debug_mode("error")
            try:
                plan.run(q, k_cache, v_cache, out=buf)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        checked_run()
        allocs = {}  # what one eager run allocates, at two steps' lengths (issue 8: nothing sized by data)
        for name, lens in (("a", lens_a), ("b", lens_b)):
            plan.plan(lens, table)
            plan.run(q, k_cache, v_cache, out=buf)
            torch.cuda.synchronize()
            before = torch.cuda.memory_stats()
            plan.run(q, k_cache, v_cache, out=buf)
            torch.cuda.synchronize()
            after = torch.cuda.memory_stats()
            allocs[name] = tuple(after[k] - before[k] for k in ("allocation.all.allocated",
                                                                 "allocated_bytes.all.allocated"))
        plan.plan(lens_a, table)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # the context synchronises on entry: outside the debug mode
            checked_run()
        plan.plan(lens_b, table)
        graph.replay()
        torch.cuda.synchronize()
        replayed = buf.clone()
        how = "captured in a CUDA graph, replayed after plan() with new lengths"
        alloc = {"allocations_per_run": allocs["a"][0], "allocated_bytes_per_run": allocs["a"][1],
                 "same_allocations_at_other_lengths": allocs["a"] == allocs["b"]}
    else:
        alloc = {}
        plan.plan(lens_b, table)
        replayed = plan.run(q, k_cache, v_cache).clone()
        how = "eager only (no CUDA on this machine)"
    eager = plan.run(q, k_cache, v_cache)
    worst, ok = 0.0, torch.equal(replayed, eager)
    for b in range(B):
        L = int(lens_b[b])
        k = k_cache[table[b].long()].flatten(0, 1)[:L]
        v = v_cache[table[b].long()].flatten(0, 1)[:L]
        ro, _ = _ref_rows(q[b:b + 1], k, v, 1 / math.sqrt(d), torch.float64)
        bo, _ = _ref_rows(q[b:b + 1], k, v, 1 / math.sqrt(d), dtype)
        c = compare(replayed[b:b + 1], ro, bo.to(dtype), dtype=dtype)
        ok, worst = ok and c["ok"], max(worst, c["err"] / max(c["tol"], 1e-30))
    ok = ok and alloc.get("same_allocations_at_other_lengths", True)
    out["graph"] = {"status": "ok" if ok else "FAIL", "how": how, "replay_equals_eager": bool(torch.equal(replayed, eager)),
                    "worst_err_over_tol": worst, **alloc}


# ----------------------------------------------------------------------------- report


def environment(device):
    import torch
    import triton

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "triton": getattr(triton, "__version__", "?"), "device": str(device),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except Exception:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            env["driver"] = "unknown (nvidia-smi not found)"
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _f(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "ok" if v else "**FAIL**"
    if isinstance(v, float):
        return "nan" if v != v else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")
    return str(v)


def markdown(res):
    lines = [f"# cpattn device check ({'DRY RUN: CPU, Triton interpreter, timings meaningless' if res['dry_run'] else 'GPU'})",
             "", "| " + " | ".join(f"{k}: {v}" for k, v in res["env"].items()) + " |", "",
             "## Correctness (Triton kernels vs float64 reference; tolerance: 2x plain same-precision error)", "",
             "| op | case | ok | out err | out tol | lse err | lse tol | status |", "|---|---|---|---|---|---|---|---|"]
    for r in res["correctness"]:
        lines.append(f"| {r['section']} | {r['what']} | {_f(r.get('ok'))} | {_f(r.get('out_err'))} | {_f(r.get('out_tol'))} "
                     f"| {_f(r.get('lse_err'))} | {_f(r.get('lse_tol'))} | {r.get('status', '')} |")
    lines += ["", "## Timings (ceilings measured in the same run)", "",
              "| op | case | impl | ms | GB/s | TFLOP/s | of ceiling | goal | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["timing"]:
        lines.append(f"| {r['section']} | {r['what']} | {r.get('impl', '')} | {_f(r.get('ms'))} | {_f(r.get('GBps'))} "
                     f"| {_f(r.get('TFLOPs'))} | {_f(r.get('of_ceiling'))} | {_f(r.get('goal'))} | {r.get('status', '')} |")
    lines += ["", "## Plan/run under a CUDA graph", "", "- " + ", ".join(f"{k}: {_f(v)}" for k, v in res["graph"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under the Triton interpreter")
    ap.add_argument("--json", default="device_check.json")
    ap.add_argument("--md", default="device_check.md")
    ap.add_argument("--dtypes", default=None, help="comma list (default: bfloat16,float16; dry run: bfloat16)")
    ap.add_argument("--only", default="merge,paged,varlen,graph", help="comma list of sections")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's cpattn
    import torch

    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("device_check: no CUDA device here; use --dry-run for the CPU interpreter run", file=sys.stderr)
        return 2
    S = SIZES["dry" if args.dry_run else "full"]
    dtypes = [getattr(torch, name) for name in (args.dtypes or ("bfloat16" if args.dry_run else "bfloat16,float16")).split(",")]
    only = set(args.only.split(","))
    timer = _timer(device)
    res = {"dry_run": args.dry_run, "env": environment(device), "correctness": [], "timing": [], "graph": {}}
    t0 = time.perf_counter()
    for dtype in dtypes:
        for section, fn, cfgs in (("merge", run_merge, S["merge"]), ("paged", run_paged, S["paged"]),
                                  ("varlen", run_varlen, S["varlen"])):
            if section not in only:
                continue
            for cfg in cfgs:
                label = f"{cfg.get('name', '')} {cfg} {str(dtype)[6:]}"
                _guard(res["correctness"], section, label, lambda: fn(cfg, dtype, device, S, timer, res))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if "graph" in only:
        try:
            run_graph(device, dtypes[0], args.dry_run, res)
        except Exception as exc:
            res["graph"] = {"status": f"error: {type(exc).__name__}: {str(exc)[:300]}"}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2, default=str)
    md = markdown(res)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    print(f"wall: {res['wall_s']} s; wrote {args.json} and {args.md}")
    failed = [r for r in res["correctness"] if not r.get("ok")]
    graph_bad = res["graph"].get("status", "").startswith(("FAIL", "error"))
    return 1 if failed or graph_bad else 0


if __name__ == "__main__":
    sys.exit(main())
