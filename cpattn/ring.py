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


@dataclass
class Step:
    """The keys one local kernel call sees: block of rank ``src`` (ring) or the whole prompt
    (all-gather), as device tensors plus the host copies the kernel would otherwise read."""

    src: int
    rows: int  # key rows
    k_cu: torch.Tensor  # [B+1] int64, on the device
    k_pos: torch.Tensor  # [rows] int64 positions, on the device
    host: dict  # {"cu_q", "cu_k"[, "q_runs", "k_runs"]} for kernels that take ``host=``


@dataclass
class Schedule:
    """Everything a PCP call computes on the host, once per batch (``PcpPrefillPlan.plan``)."""

    cu: tuple
    world: int
    rank: int
    method: str
    tmax: int  # rows of the largest rank: every ring message / gathered block has this many
    me: object  # this rank's PcpPartition
    q_cu: torch.Tensor  # [B+1] int64 on the device
    q_pos: torch.Tensor  # [Tr] int64 on the device
    steps: list  # ring: step i holds rank (r - i) mod N's block; all-gather: one step over the prompt
    order: torch.Tensor | None  # rows of the [N * tmax] gathered buffer in global order (None at N = 1)


def schedule(cu: tuple[int, ...], n: int, r: int, method: str, causal: bool, device) -> Schedule:
    """The host work of one PCP batch: partitions, positions, the ring's per-step key metadata
    (or the all-gather's global order), and the kernel's host tables; device tensors on ``device``."""
    from .backends.pytorch.varlen import _runs  # host-side run detection, the kernel's own

    parts = [_partition(cu, n, s) for s in range(n)]
    me = parts[r]
    tmax = max(p.num_tokens for p in parts)
    cu_q = [int(x) for x in me.local_cu_seqlens.tolist()]
    q_runs = _runs(me.positions, cu_q) if causal else None

    def step(src, k_cu_list, k_pos):
        host = {"cu_q": cu_q, "cu_k": k_cu_list}
        if causal:
            host.update(q_runs=q_runs, k_runs=_runs(k_pos, k_cu_list))
        return Step(src, k_pos.numel(), torch.tensor(k_cu_list, dtype=torch.int64, device=device),
                    k_pos.to(device), host)

    order = None
    if n > 1:  # rows of the [N * tmax] gathered buffer in global order (all-gather KV, restore)
        src, kpos = _global_order(cu, n, tmax)
        order = src.to(device)
    if method == "ring" or n == 1:
        steps = [step((r - i) % n, [int(x) for x in parts[(r - i) % n].local_cu_seqlens.tolist()],
                      parts[(r - i) % n].positions) for i in range(n)]
    else:
        steps = [step(-1, list(cu), kpos)]
    return Schedule(cu, n, r, method, tmax, me, me.local_cu_seqlens.to(device), me.positions.to(device), steps, order)


def _kernel(q, k, v, sched: Schedule, st: Step, causal, scale, backend):
    """One local attention call; ``backend`` a Backend object (chosen before any collective)."""
    extra = {"host": st.host} if backend.accepts("attention", "host") else {}
    return backend.run(
        "attention", q=q, k=k, v=v, cu_seqlens_q=sched.q_cu, cu_seqlens_k=st.k_cu,
        q_positions=sched.q_pos if causal else None, k_positions=st.k_pos if causal else None,
        causal=causal, scale=scale, **extra,
    )


def ring_prefill(q, k, v, sched: Schedule, *, group, causal: bool, scale: float, backend, merge_backend=None):
    """Pass-KV ring; returns ``(out [Tr, Hq, Dv] q.dtype, lse [Tr, Hq] float32)``. ``backend``:
    the attention kernel's Backend; ``merge_backend``: the merge's backend name (None: automatic)."""
    global last_times
    times = PcpTimes(method="ring")
    start = time.perf_counter()
    n, r = sched.world, sched.rank
    dqk = k.shape[-1]
    if n == 1:  # no ring: the local kernel on the inputs as they are
        t0 = time.perf_counter()
        out, lse = _kernel(q, k, v, sched, sched.steps[0], causal, scale, backend)
        times.compute_s = time.perf_counter() - t0
        times.total_s = time.perf_counter() - start
        last_times = times
        return out, lse
    cur = _pack(k, v, sched.tmax)
    q = _head_major_view(q)
    ring = comm.RingComm(group)
    times.pack_s = time.perf_counter() - start
    held = []  # partials not merged yet: the first step's, then the accumulator
    # float32 merging for 16-bit inputs, float64 for float32/float64 (no error visible at their precision)
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else torch.float64
    out = lse = None
    for i, st in enumerate(sched.steps):
        nxt = None
        if i < n - 1:
            nxt = ring.send_recv(cur)
            ring.commit()
        t0 = time.perf_counter()
        blk = cur[: st.rows]
        o, l = _kernel(q, blk[..., :dqk], blk[..., dqk:], sched, st, causal, scale, backend)
        t1 = time.perf_counter()
        if i == 0:
            held = [(o, l)]
        elif i == n - 1:  # last step: merge straight into the output dtype (one rounding)
            out, lse = _empty_like_out(o), torch.empty_like(l)
            _merge(held + [(o, l)], out, lse, merge_backend, acc_dtype)
        else:  # middle steps: merge into the accumulator
            if i == 1:
                acc = torch.empty(o.shape, dtype=acc_dtype, device=o.device)
                acc_lse = torch.empty(l.shape, dtype=acc_dtype, device=l.device)
            else:
                acc, acc_lse = held[0]  # in place
            _merge(held + [(o, l)], acc, acc_lse, merge_backend, acc_dtype)
            held = [(acc, acc_lse)]
        t2 = time.perf_counter()
        if nxt is not None:
            ring.wait()
            cur = nxt
        t3 = time.perf_counter()
        times.compute_s += t1 - t0
        times.merge_s += t2 - t1
        times.wait_s += t3 - t2
        times.steps.append((st.src, t1 - t0, t3 - t2))
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


def allgather_prefill(q, k, v, sched: Schedule, *, group, causal: bool, scale: float, backend, merge_backend=None):
    """All-gather KV once, then local masked attention; same return as :func:`ring_prefill`."""
    global last_times
    n = sched.world
    if n == 1:  # nothing to gather: the same local kernel call as the ring's
        return ring_prefill(q, k, v, sched, group=group, causal=causal, scale=scale, backend=backend)
    times = PcpTimes(method="allgather")
    start = time.perf_counter()
    dqk = k.shape[-1]
    kv = _pack(k, v, sched.tmax)
    t0 = time.perf_counter()
    gathered = comm.all_gather(kv, group)  # [N, Tmax, Hkv, Dqk + Dv]
    t1 = time.perf_counter()
    glob = gathered.reshape(n * sched.tmax, *kv.shape[1:]).index_select(0, sched.order)
    t2 = time.perf_counter()
    out, lse = _kernel(q, glob[..., :dqk], glob[..., dqk:], sched, sched.steps[0], causal, scale, backend)
    t3 = time.perf_counter()
    times.pack_s = (t0 - start) + (t2 - t1)
    times.wait_s = t1 - t0
    times.compute_s = t3 - t2
    times.bytes_sent = kv.numel() * kv.element_size() * (n - 1) if n > 1 else 0
    times.total_s = t3 - start
    last_times = times
    return out, lse
