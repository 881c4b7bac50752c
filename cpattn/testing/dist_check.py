"""Check the distributed ops on a real process group against the float64 oracle: one command
for a machine with several NPUs (HCCL), also runnable on CPU with gloo.

    torchrun --nproc-per-node 2 -m cpattn.testing.dist_check --dist-backend hccl --device npu --backend ascendc
    torchrun --nproc-per-node 3 -m cpattn.testing.dist_check --dist-backend gloo --device cpu --hccl-paths --quick
                                                      # how it is tested here (comm's HCCL paths on gloo)

Every rank builds the same global inputs from a seed (on the CPU), takes its share, runs
``dcp_decode_attention`` (every combine strategy, both head modes, GQA and MLA) and
``pcp_ring_prefill`` (both methods, causal) with the requested kernel ``--backend``, and compares
its own rows with the float64 oracle under the project's tolerance rule: at most 2x the error of
the same maths in plain PyTorch at the input precision (floor: one ulp of the output dtype).
Rank 0 prints ``N passed, M failed``; the exit status is 1 when any case failed on any rank.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import cpattn
from cpattn import dcp_combine, layout, reference
from cpattn.pcp import METHODS as PCP_METHODS

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    if a.numel() == 0:
        return 0.0
    if not torch.equal(torch.isnan(a), torch.isnan(ref)):
        return float("inf")
    same_inf = torch.isinf(a) & torch.isinf(ref) & (torch.sign(a) == torch.sign(ref))
    d = (a - ref).abs().masked_fill(same_inf | torch.isnan(ref), 0.0)
    return float(d.max())


def _close(got, ref, base, dtype) -> tuple[bool, str]:
    fin = ref[torch.isfinite(ref)]
    floor = torch.finfo(dtype).eps * max(float(fin.abs().max()) if fin.numel() else 1.0, 1.0)
    err, tol = _err(got, ref), 2.0 * max(_err(base, ref), floor)
    return err <= tol, f"err {err:.2e} tol {tol:.2e}"


def _dcp_cases(quick: bool):
    for mla in (False, True):
        for heads in ("replicated", "sharded"):
            for dt in (("bfloat16", "float32") if quick else ("bfloat16", "float16", "float32")):
                yield mla, heads, dt


def check_dcp(n: int, r: int, dev, backend, quick: bool, out: list) -> None:
    for mla, heads, dt_name in _dcp_cases(quick):
        dt = DTYPES[dt_name]
        g = torch.Generator().manual_seed(7)
        lens, nq = [0, 1, 37, 130][: 3 if quick else 4], [0, 1, 2, 3][: 3 if quick else 4]
        hkv, dqk, dv = (1, 72, 64) if mla else (2, 64, 48)
        hq = 4 * n if heads == "sharded" else 8
        k = torch.randn(sum(lens), hkv, dqk, generator=g).to(dt)
        v = None if mla else torch.randn(sum(lens), hkv, dv, generator=g).to(dt)
        q = (torch.randn(sum(nq), hq, dqk, generator=g) * 1.5).to(dt)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        qsl = torch.tensor([0] + nq).cumsum(0).to(torch.int32)
        sh = layout.shard_kv(k, v, seq_lens, world_size=n, block_size=16, interleave=1)[r]
        vv = k[..., :dv] if mla else v
        cu_k = torch.tensor([0] + lens).cumsum(0)
        kw = dict(cu_seqlens_q=qsl.long(), cu_seqlens_k=cu_k, causal=True)
        ro, rl = reference.attention(q, k, vv, **kw)
        bo, bl = reference.attention(q, k, vv, **kw, dtype=dt)
        s = hq // n
        h = slice(r * s, (r + 1) * s) if heads == "sharded" else slice(None)
        ql = q[:, h].contiguous() if heads == "sharded" else q
        for combine in dcp_combine.allowed(heads):
            name = f"dcp mla={mla} heads={heads} {dt_name} combine={combine}"
            try:
                o, l = cpattn.dcp_decode_attention(
                    ql.to(dev), sh.k_cache.to(dev), None if mla else sh.v_cache.to(dev), sh.block_table.to(dev),
                    seq_lens.to(dev), group=None, query_start_loc=qsl.to(dev), v_head_dim=dv if mla else None,
                    heads=heads, combine=combine, return_lse=True, backend=backend)
                ok1, m1 = _close(o.cpu(), ro[:, h], bo[:, h].to(dt), dt)
                ok2, m2 = _close(l.cpu(), rl[:, h], bl[:, h], torch.float32)
                out.append((name, ok1 and ok2, f"out {m1}; lse {m2}"))
            except Exception as exc:  # report, keep going: every rank runs the same cases
                out.append((name, False, f"{type(exc).__name__}: {exc}"))


def check_pcp(n: int, r: int, dev, backend, quick: bool, out: list) -> None:
    for dt_name in (("bfloat16", "float32") if quick else ("bfloat16", "float16", "float32")):
        dt = DTYPES[dt_name]
        g = torch.Generator().manual_seed(11)
        cu = torch.tensor([0, 1, 38, 38 + (40 if quick else 300)])
        T = int(cu[-1])
        q = torch.randn(T, 8, 64, generator=g).to(dt)
        k = torch.randn(T, 2, 64, generator=g).to(dt)
        v = torch.randn(T, 2, 48, generator=g).to(dt)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
        ro, rl = reference.attention(q, k, v, **kw)
        bo, bl = reference.attention(q, k, v, **kw, dtype=dt)
        idx = cpattn.pcp_partition(cu, n, r).index
        for method in PCP_METHODS:
            name = f"pcp {dt_name} method={method}"
            try:
                o, l = cpattn.pcp_ring_prefill(q[idx].to(dev), k[idx].to(dev), v[idx].to(dev), cu, group=None,
                                               method=method, return_lse=True, backend=backend)
                ok1, m1 = _close(o.cpu(), ro[idx], bo[idx].to(dt), dt)
                ok2, m2 = _close(l.cpu(), rl[idx], bl[idx], torch.float32)
                out.append((name, ok1 and ok2, f"out {m1}; lse {m2}"))
            except Exception as exc:
                out.append((name, False, f"{type(exc).__name__}: {exc}"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dist-backend", default="hccl", help="torch.distributed backend (hccl, nccl, gloo)")
    ap.add_argument("--device", default="npu", help="device of the op inputs (npu, cuda, cpu)")
    ap.add_argument("--backend", default=None, help="cpattn kernel backend (ascendc, triton, pytorch, ...; default: automatic)")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    ap.add_argument("--hccl-paths", action="store_true",
                    help="route collectives through comm's HCCL-safe paths whatever the backend (checks them on gloo)")
    a = ap.parse_args(argv)
    if a.hccl_paths:
        from cpattn import comm

        comm.PORTABLE_BACKENDS = comm.PORTABLE_BACKENDS | {a.dist_backend}
    if a.device == "npu":
        import torch_npu  # noqa: F401  (only on request: it needs CANN)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(a.device, local) if a.device != "cpu" else torch.device("cpu")
    if a.device == "npu":
        torch.npu.set_device(dev)  # type: ignore[attr-defined]
    elif a.device == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(a.dist_backend)
    n, r = dist.get_world_size(), dist.get_rank()
    results: list = []
    check_dcp(n, r, dev, a.backend, a.quick, results)
    check_pcp(n, r, dev, a.backend, a.quick, results)
    gathered: list = [None] * n
    dist.all_gather_object(gathered, results)
    dist.destroy_process_group()
    if r != 0:
        return 0 if all(ok for res in gathered for _, ok, _ in res) else 1
    failed = 0
    for name_i, (name, _, _) in enumerate(gathered[0]):
        oks = [res[name_i][1] for res in gathered]
        if not all(oks):
            failed += 1
            for rank, res in enumerate(gathered):
                if not res[name_i][1]:
                    print(f"FAIL {name} (rank {rank}): {res[name_i][2]}")
        else:
            print(f"ok   {name}")
    print(f"{len(gathered[0]) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
