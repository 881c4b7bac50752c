"""``cpattn-bench merge``: time the N-way merge per backend against memcpy bandwidth.

Bytes counted per call: every input read once (N outputs and N float32 LSEs) and the result
written once (output and LSE). ``eager`` is the formula most frameworks write, as separate
tensor ops over the stacked ``[N, T, H, D]`` outputs; it is here as the baseline to beat.
"""
from __future__ import annotations

import torch

import cpattn
from cpattn import reference

from .common import DTYPES, choice_list, int_list, json_path, memcpy_bandwidth, positive_int, print_table, timeit, write_json

COLUMNS = ["backend", "dtype", "ways", "T", "H", "D", "median_ms", "GB/s", "of_memcpy", "vs_eager", "check"]


def eager_merge(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual framework formula over ``[N, T, H, D]`` (float32 math), one op at a time."""
    lses = lses.masked_fill(torch.isnan(lses) | torch.isposinf(lses), float("-inf"))
    m = lses.max(dim=0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)
    s = w.sum(dim=0)
    frac = w / s
    out = (outs.float() * frac[..., None]).sum(dim=0)
    return out.to(outs.dtype), m + torch.log(s)


def _runner(backend: str):
    if backend == "eager":
        return eager_merge
    return lambda outs, lses: cpattn.merge_attn_states_n(outs, lses, backend=backend)


def _check(fn, outs, lses, dtype, rows: int = 256) -> str:
    """Max error vs the float64 reference on the first ``rows`` tokens, relative to 2x the
    same-precision plain-PyTorch error (``ok`` when within)."""
    o, l = outs[:, :rows], lses[:, :rows]
    got = fn(o, l)
    ref = reference.merge_n(list(o), list(l))
    base = reference.merge_n(list(o), list(l), dtype=dtype)
    err = (got[0].double() - ref[0]).abs().max().item() if o.numel() else 0.0
    tol = 2 * max((base[0].to(dtype).double() - ref[0]).abs().max().item() if o.numel() else 0.0,
                  torch.finfo(dtype).eps)
    return f"{'ok' if err <= tol else 'FAIL'} ({err:.1e})"


def bench(tokens: int, heads: int, head_dim: int, dtypes: list[str], ways: list[int], backends: list[str],
          check: bool, iters: int = 5) -> tuple[list[dict], float]:
    bw = memcpy_bandwidth()
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for n in ways:
            g = torch.Generator().manual_seed(n)
            outs = torch.randn(n, tokens, heads, head_dim, generator=g).to(dtype)
            lses = torch.randn(n, tokens, heads, generator=g) * 3
            nbytes = (n + 1) * (outs[0].numel() * outs.element_size() + lses[0].numel() * 4)
            eager_t = None
            for b in backends:
                fn = _runner(b)
                t = timeit(lambda: fn(outs, lses), warmup=1, iters=iters)
                if b == "eager":
                    eager_t = t
                rows.append(dict(backend=b, dtype=dname, ways=n, T=tokens, H=heads, D=head_dim,
                                 median_ms=t * 1e3, **{"GB/s": nbytes / t / 1e9, "of_memcpy": nbytes / t / 1e9 / bw},
                                 check=_check(fn, outs, lses, dtype) if check else "-"))
            for r in rows:
                if eager_t and r["dtype"] == dname and r["ways"] == n:
                    r["vs_eager"] = eager_t / (r["median_ms"] / 1e3)
            del outs, lses
    return rows, bw


def register(subs) -> None:
    p = subs.add_parser("merge", help="N-way LSE merge: time, GB/s, fraction of memcpy bandwidth")
    p.add_argument("--tokens", type=positive_int, default=16384)
    p.add_argument("--heads", type=positive_int, default=32)
    p.add_argument("--head-dim", type=positive_int, default=128)
    p.add_argument("--dtype", type=choice_list(DTYPES), default="float32,bfloat16",
                   help="comma list of float32,bfloat16,float16")
    p.add_argument("--ways", type=int_list, default="2,8", help="comma list of N")
    p.add_argument("--backends", type=choice_list([*cpattn.list_backends(), "eager"]), default="pytorch,eager",
                   help="comma list: pytorch,reference,eager (triton on CUDA/NPU)")
    p.add_argument("--iters", type=positive_int, default=5)
    p.add_argument("--check", action="store_true", help="compare each result with the float64 reference")
    p.add_argument("--json", metavar="PATH", type=json_path, help="also write the results as JSON")
    p.set_defaults(func=run, validate=_validate)


def _validate(args) -> str | None:
    """A requested backend that cannot run the benchmark's (CPU) tensors: say why now."""
    from cpattn.backends import BackendError, get_backend

    o, l = torch.zeros(1, 1, 1), torch.zeros(1, 1)
    for name in args.backends:
        if name == "eager":
            continue
        try:
            reasons = get_backend(name).reasons("merge", {"outs": [o, o], "lses": [l, l], "out": o, "out_lse": l})
        except BackendError as exc:
            reasons = [str(exc)]
        if reasons:
            return f"--backends {name}: cannot run here: {'; '.join(reasons)}"
    return None


def run(args) -> int:
    rows, bw = bench(args.tokens, args.heads, args.head_dim, args.dtype, args.ways, args.backends, args.check,
                     args.iters)
    print(f"memcpy bandwidth (read+write) in this run: {bw:.1f} GB/s; threads: {torch.get_num_threads()}")
    print_table(rows, COLUMNS, "merge_attn_states_n")
    if args.json:
        write_json(args.json, {"op": "merge", "memcpy_GBps": bw, "rows": rows})
    return 0 if all(not str(r["check"]).startswith("FAIL") for r in rows) else 1


def tour() -> bool:
    rows, bw = bench(2048, 8, 64, ["float32", "bfloat16"], [2, 4], ["pytorch", "eager"], check=True, iters=3)
    print(f"\nmemcpy bandwidth in this run: {bw:.1f} GB/s")
    print_table(rows, COLUMNS, "merge (tour: checked against the float64 reference)")
    return all(str(r["check"]).startswith("ok") for r in rows)
