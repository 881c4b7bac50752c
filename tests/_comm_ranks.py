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
