"""The two PCP methods behind :func:`cpattn.pcp_ring_prefill`: pass-KV ring and all-gather KV.

Both take this rank's tokens in :func:`cpattn.pcp_partition` order and return this rank's rows of
attention over the whole prompt. They run after the public layer validated the input and made
every rank agree on it, so they assume consistent shapes.

**Ring** (N steps): at step ``i`` rank ``r`` holds the KV block of rank ``(r - i) mod N``. It
queues sending that block to ``r + 1`` and receiving the next one from ``r - 1`` (one batched
isend/irecv, :class:`cpattn.comm.RingComm`), computes its queries against the block it holds
while the next one is in flight, then waits. K and V travel packed in one ``[Tmax, Hkv, Dqk+Dv]``
buffer (GQA heads are never repeated; blocks are padded to the largest rank's token count so
every message has one size). The causal mask works on global positions: with the head-tail
partition a block from a lower rank is seen by all of this rank's queries but only through its
head chunk, and a block from a higher rank only by this rank's tail chunk; the kernel skips
every (query run, key run) pair the mask hides entirely. Partials are merged with the backend's
merge kernel: step 0's partial waits for step 1, middle steps accumulate in a **float32**
accumulator (float64 for float32/float64 inputs), and the last step merges straight into the
output dtype, so the result is rounded once and never accumulated in bf16 across steps.

**All-gather**: one all-gather of the packed KV, reordered into global token order, then one
local masked attention of this rank's queries over the whole prompt. No merge across ranks.

Each call records where its time went in :data:`last_times` (a :class:`PcpTimes`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from . import comm
from .backends import dispatch, select
from .backends.pytorch.merge import merge as wide_merge
from .partition import _partition

__all__ = ["PcpTimes", "last_times", "ring_prefill", "allgather_prefill"]


@dataclass
class PcpTimes:
    """Seconds spent by one rank in one PCP call, by kind of work."""

    method: str = ""
    compute_s: float = 0.0  # local attention kernels
    merge_s: float = 0.0  # merging partials (float32 accumulator; float64 for float32 input)
    wait_s: float = 0.0  # ring: waiting for the next block after computing; all-gather: the collective
    pack_s: float = 0.0  # packing K|V, padding, reordering
    total_s: float = 0.0
    bytes_sent: int = 0
    steps: list = field(default_factory=list)  # ring: per step (source rank, compute_s, wait_s)


last_times = PcpTimes()


def _pack(k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows, Hkv, Dqk + Dv]``: K and V side by side, zero rows below the local tokens."""
    kv = torch.empty(rows, k.shape[1], k.shape[2] + v.shape[2], dtype=k.dtype, device=k.device)
    t = k.shape[0]
    kv[:t, :, : k.shape[2]] = k
    kv[:t, :, k.shape[2]:] = v
    kv[t:] = 0
    return kv


def _head_major_view(q: torch.Tensor) -> torch.Tensor:
    """The same ``[Tr, Hq, D]`` values as a view of a head-major buffer: the CPU kernel works on
    head-major tiles, and would otherwise copy ``q`` again at every ring step."""
    return q.transpose(0, 1).contiguous().transpose(0, 1)


def _kernel(q, k, v, qpart, kcu, kpos, causal, scale, backend):
    return dispatch(
        "attention", backend, q=q, k=k, v=v,
        cu_seqlens_q=qpart.local_cu_seqlens, cu_seqlens_k=kcu,
        q_positions=qpart.positions if causal else None, k_positions=kpos if causal else None,
        causal=causal, scale=scale,
    )


def ring_prefill(q, k, v, cu: tuple[int, ...], *, group, causal: bool, scale: float, backend):
    """Pass-KV ring; returns ``(out [Tr, Hq, Dv] q.dtype, lse [Tr, Hq] float32)``."""
    global last_times
    times = PcpTimes(method="ring")
    start = time.perf_counter()
    n, r = comm.world_size(group), comm.rank(group)
    parts = [_partition(cu, n, s) for s in range(n)]
    me = parts[r]
    dqk = k.shape[-1]
    if n == 1:  # no ring: the local kernel on the inputs as they are
        t0 = time.perf_counter()
        out, lse = _kernel(q, k, v, me, me.local_cu_seqlens, me.positions, causal, scale, backend)
        times.compute_s = time.perf_counter() - t0
        times.total_s = time.perf_counter() - start
        last_times = times
        return out, lse
    tmax = max(p.num_tokens for p in parts)
    cur = _pack(k, v, tmax)
    q = _head_major_view(q)
    ring = comm.RingComm(group)
    times.pack_s = time.perf_counter() - start
    held = []  # partials not merged yet: the first step's, then the accumulator
    # float32 merging for 16-bit inputs, float64 for float32/float64 (no error visible at their precision)
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else torch.float64
    out = lse = None
    for i in range(n):
        src = (r - i) % n
        nxt = None
        if i < n - 1:
            nxt = ring.send_recv(cur)
            ring.commit()
        t0 = time.perf_counter()
        sp = parts[src]
        blk = cur[: sp.num_tokens]
        o, l = _kernel(q, blk[..., :dqk], blk[..., dqk:], me, sp.local_cu_seqlens, sp.positions, causal, scale,
                       backend)
        t1 = time.perf_counter()
        if i == 0:
            held = [(o, l)]
        elif i == n - 1:  # last step: merge straight into the output dtype (one rounding)
            out, lse = _empty_like_out(o), torch.empty_like(l)
            _merge(held + [(o, l)], out, lse, backend, acc_dtype)
        else:  # middle steps: merge into the accumulator
            if i == 1:
                acc = torch.empty(o.shape, dtype=acc_dtype, device=o.device)
                acc_lse = torch.empty(l.shape, dtype=acc_dtype, device=l.device)
            else:
                acc, acc_lse = held[0]  # in place
            _merge(held + [(o, l)], acc, acc_lse, backend, acc_dtype)
            held = [(acc, acc_lse)]
        t2 = time.perf_counter()
        if nxt is not None:
            ring.wait()
            cur = nxt
        t3 = time.perf_counter()
        times.compute_s += t1 - t0
        times.merge_s += t2 - t1
        times.wait_s += t3 - t2
        times.steps.append((src, t1 - t0, t3 - t2))
    times.bytes_sent = ring.bytes_sent
    times.total_s = time.perf_counter() - start
    last_times = times
    return out, lse


def _empty_like_out(o: torch.Tensor) -> torch.Tensor:
    return torch.empty(o.shape, dtype=o.dtype, device=o.device)


def _merge(partials, out, out_lse, backend, dtype) -> None:
    """Exact merge of ``[(o, l), ...]`` into ``out``/``out_lse`` (may be one of the inputs); weights
    and accumulation in ``dtype``. float32: the requested backend's merge kernel; float64 (float32
    inputs): the PyTorch kernel, which merges in float64 on any device (Triton has no float64)."""
    lses = [l.to(dtype) for _, l in partials]
    outs = [o for o, _ in partials]
    if dtype == torch.float64:
        wide_merge(outs, lses, out, out_lse, nan_propagate=True)  # strict: a poisoned (NaN) partial stays NaN
    else:
        inputs = dict(outs=outs, lses=lses, out=out, out_lse=out_lse)
        select("merge", backend, inputs).run("merge", **inputs, nan_propagate=True)


@lru_cache(maxsize=32)
def _global_order(cu: tuple[int, ...], n: int, tmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flat ``[N * Tmax]`` gathered buffer in global token order, and each global
    token's position inside its sequence."""
    total = cu[-1]
    src = torch.empty(total, dtype=torch.int64)
    for s in range(n):
        p = _partition(cu, n, s)
        src[p.index] = s * tmax + torch.arange(p.num_tokens, dtype=torch.int64)
    lens = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.int64)
    starts = torch.tensor(cu[:-1], dtype=torch.int64)
    pos = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, lens)
    return src, pos


def allgather_prefill(q, k, v, cu: tuple[int, ...], *, group, causal: bool, scale: float, backend):
    """All-gather KV once, then local masked attention; same return as :func:`ring_prefill`."""
    global last_times
    n, r = comm.world_size(group), comm.rank(group)
    if n == 1:  # nothing to gather: the same local kernel call as the ring's
        return ring_prefill(q, k, v, cu, group=group, causal=causal, scale=scale, backend=backend)
    times = PcpTimes(method="allgather")
    start = time.perf_counter()
    parts = [_partition(cu, n, s) for s in range(n)]
    me = parts[r]
    dqk = k.shape[-1]
    tmax = max(p.num_tokens for p in parts)
    kv = _pack(k, v, tmax)
    t0 = time.perf_counter()
    gathered = comm.all_gather(kv, group)  # [N, Tmax, Hkv, Dqk + Dv]
    t1 = time.perf_counter()
    src, kpos = _global_order(cu, n, tmax)
    glob = gathered.reshape(n * tmax, *kv.shape[1:])[src.to(kv.device)]
    t2 = time.perf_counter()
    kcu = torch.tensor(cu, dtype=torch.int64)
    out, lse = _kernel(q, glob[..., :dqk], glob[..., dqk:], me, kcu, kpos.to(q.device), causal, scale, backend)
    t3 = time.perf_counter()
    times.pack_s = (t0 - start) + (t2 - t1)
    times.wait_s = t1 - t0
    times.compute_s = t3 - t2
    times.bytes_sent = kv.numel() * kv.element_size() * (n - 1) if n > 1 else 0
    times.total_s = t3 - start
    last_times = times
    return out, lse
