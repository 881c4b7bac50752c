"""Rank-side functions for tests/test_comm.py (module-level: GlooWorld pickles them by reference)."""
from __future__ import annotations

import builtins
import time

import torch
import torch.distributed as dist

from cpattn import comm


def collectives() -> dict:
    r, n = comm.rank(), comm.world_size()
    t = torch.arange(3, dtype=torch.float32) + 10 * r
    ring = comm.RingComm()
    got = ring.send_recv(t.clone())
    ring.commit()
    ring.wait()
    return {
        "gather": comm.all_gather(t).tolist(),
        "reduce": comm.all_reduce_sum(torch.full((2,), float(r + 1))).tolist(),
        "scatter": comm.reduce_scatter_sum(torch.arange(2 * n, dtype=torch.float32) * (r + 1)).tolist(),
        "a2a": comm.all_to_all(torch.arange(n, dtype=torch.float32) + 100 * r).tolist(),
        "ring": got.tolist(),
        "ring_bytes": ring.bytes_sent,
    }


def ring_many_steps(steps: int) -> list[float]:
    """Pass a token around the ring ``steps`` times with the next transfer in flight."""
    ring = comm.RingComm()
    cur = torch.tensor([float(comm.rank())])
    seen = [cur.item()]
    for _ in range(steps):
        nxt = ring.send_recv(cur)
        ring.commit()
        ring.wait()
        cur = nxt
        seen.append(cur.item())
    return seen


def refuse_on(bad_rank: int, exc_type: str = "ValueError"):
    error = getattr(builtins, exc_type)(f"rank {comm.rank()} refuses its input") if comm.rank() == bad_rank else None
    comm.agree("toy_op", error, {"n": 1})
    return "passed"


def disagree_on_field():
    comm.agree("toy_op", None, {"cu_seqlens": [0, 3 + (comm.rank() == 1)], "heads": 8})
    return "passed"


def agree_ok_then_collective():
    comm.agree("toy_op", None, {"cu_seqlens": [0, 3], "heads": 8})
    return comm.all_reduce_sum(torch.ones(1)).item()


def hang_on_rank0(seconds: float):
    if dist.get_rank() == 0:
        time.sleep(seconds)
    dist.barrier()
    return "done"


def rank_and_threads():
    return comm.rank(), comm.world_size(), torch.get_num_threads()


def portable_vs_native(dtype_name: str, numel: int) -> dict:
    """Every comm collective on ``numel``-element tensors of ``dtype_name``, once through gloo's
    own collectives and once through the HCCL-safe paths (comm.PORTABLE_BACKENDS), as raw bytes."""
    from unittest import mock

    r, n = comm.rank(), comm.world_size()
    dt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(1234 + r)
    if dt.is_floating_point:
        # dyadic values: every sum below is exact, whatever the order of the additions
        base = (torch.randint(-64, 64, (n * numel,), generator=g).to(torch.float64) / 8).to(dt)
    elif dt == torch.bool:
        base = torch.randint(0, 2, (n * numel,), generator=g).bool()
    else:
        base = torch.randint(0, 100, (n * numel,), generator=g).to(dt)

    bufs = []

    def buf(k: int, given: bool):
        """A preallocated output (stale contents) when ``given``; the result must land in it."""
        if not given:
            return None
        b = torch.ones(k, dtype=torch.float64).to(dt)
        bufs.append(b)
        return b

    def run(given: bool = False):
        bufs.clear()
        out = {"gather": comm.all_gather(base[:numel], out=buf(n * numel, given)),
               "a2a": comm.all_to_all(base, out=buf(n * numel, given))}
        if dt != torch.bool and dt != torch.uint8:
            out["reduce"] = comm.all_reduce_sum(base[:numel].clone())
            out["scatter"] = comm.reduce_scatter_sum(base, out=buf(numel, given))
        res = {k: (tuple(v.shape), str(v.dtype), bytes(v.contiguous().view(-1).view(torch.uint8).tolist()))
               for k, v in out.items()}
        if given:  # each result is a view of its buffer
            res["in_place"] = [v.data_ptr() == b.data_ptr() or v.numel() == 0
                               for v, b in zip([out[k] for k in ("gather", "a2a", "scatter") if k in out], bufs)]
        return res

    native = run()
    native_out = run(True)
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kw):
            tensors = [a for a in args if isinstance(a, torch.Tensor)] or [args[0][0]]
            calls.append((name, str(tensors[0].dtype)))
            return fn(*args, **kw)
        return wrapped

    with mock.patch.object(comm, "PORTABLE_BACKENDS", frozenset({"gloo"})), \
            mock.patch.object(comm, "_all_gather_flat", spy("all_gather_flat", comm._all_gather_flat)), \
            mock.patch.object(comm, "_reduce_scatter_flat", spy("reduce_scatter_flat", comm._reduce_scatter_flat)), \
            mock.patch.object(dist, "all_gather", spy("all_gather", dist.all_gather)), \
            mock.patch.object(dist, "all_reduce", spy("all_reduce", dist.all_reduce)), \
            mock.patch.object(dist, "all_to_all_single", spy("all_to_all_single", dist.all_to_all_single)), \
            mock.patch.object(dist, "P2POp", spy("p2p", dist.P2POp)):
        portable = run()
        portable_out = run(True)
    return {"native": native, "portable": portable, "calls": calls, "native_out": native_out,
            "portable_out": portable_out}
