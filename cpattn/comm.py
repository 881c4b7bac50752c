"""Collectives over ``torch.distributed``: the only module that calls it.

Works with gloo (CPU), NCCL (CUDA) and HCCL (NPU). ``group=None`` means the default group, or a
single process when ``torch.distributed`` is not initialised (world size 1, no collective).

Portability rules followed here (gloo in torch 2.13): all-gathers use a flat ``world * n``
buffer, never a stacked output or uneven lists; no ``PREMUL_SUM``; no send to oneself (callers
skip the ring at world size 1).

HCCL (torch_npu's ``hccl`` backend) publishes narrower support than gloo or NCCL: all-reduce and
reduce-scatter refuse float64 on Atlas A2/A3; the flat all-gather and reduce-scatter take
bf16/fp16/fp32/int8/int32/bool only and not at world sizes 3, 5, 6 or 7; ``all_to_all_single``
takes fp32 only (docs/ascendc.md, "HCCL"). On the backends in :data:`PORTABLE_BACKENDS` this
module therefore moves every tensor as a same-bytes view of a supported dtype (exact: these
collectives only move bytes), uses the list all-gather at those world sizes, and sums what HCCL
cannot sum itself locally after an all-to-all (reduce-scatter) and an all-gather (all-reduce),
with the same bytes on the wire as the bandwidth-optimal collective.
"""
from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "world_size",
    "rank",
    "all_gather",
    "all_reduce_sum",
    "reduce_scatter_sum",
    "all_to_all",
    "all_to_all_uneven",
    "RingComm",
    "agree",
    "CollectiveInputError",
    "group_name",
    "resolve_group",
    "is_process_group",
    "check_group",
    "next_call",
]


class CollectiveInputError(ValueError):
    """Raised on every rank when some rank's input was refused or ranks disagree on it."""


# torch >= 2.13 renamed the flat-buffer collectives; keep working on older releases too.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

#: Backends whose collectives go through the HCCL-safe paths below (tests add "gloo" to check them).
PORTABLE_BACKENDS = frozenset({"hccl"})
# What HCCL publishes support for (torch_npu docs for torch 2.12/2.13; ProcessGroupHCCL.cpp).
_FLAT_WORLD_UNSUPPORTED = (3, 5, 6, 7)  # flat all-gather / reduce-scatter
_REDUCE_SCATTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.int32)
_ALL_REDUCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64, torch.bool)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if _initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if _initialized() else 0


def _comm_device(group) -> torch.device:
    """Device for small metadata tensors: CPU for gloo, the backend's current device otherwise."""
    backend = dist.get_backend(group)
    return torch.device("cpu") if backend == "gloo" else torch.device(_default_device(backend))


def _default_device(backend: str) -> str:
    if backend == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    if backend == "hccl":
        return f"npu:{torch.npu.current_device()}"  # type: ignore[attr-defined]
    return "cpu"


def is_process_group(group) -> bool:
    """True for a ``torch.distributed`` ProcessGroup (None, the default group, is checked apart)."""
    return dist.is_available() and isinstance(group, dist.ProcessGroup)


def check_group(op: str, group) -> None:
    """Refuse a group that cannot run a collective: not a ProcessGroup (TypeError), or one that
    was destroyed (``destroy_process_group``), or any group once ``torch.distributed`` was shut
    down (ValueError naming the group). Without this a destroyed group reads as world size 1 and
    every rank would silently compute on its own shard alone."""
    if group is None:
        return
    if not is_process_group(group):
        raise TypeError(f"{op}: group must be a torch.distributed ProcessGroup or None; got {type(group).__name__}")
    label = _label(group)
    if not _initialized():
        raise ValueError(f"{op}: process group {label} is not usable: torch.distributed is not initialised (was "
                         f"destroy_process_group() called?); pass a live group, or None for one process")
    try:
        dist.get_rank(group)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{op}: process group {label} was destroyed (destroy_process_group) or never registered: "
                         f"create a new group with torch.distributed.new_group") from exc


def _label(group) -> str:
    try:
        return repr(group.group_name)
    except Exception:
        return f"<{type(group).__name__}>"


def group_name(group=None) -> str:
    """The name torch.library ops carry instead of a ProcessGroup (``""``: the default group, or
    a single process when ``torch.distributed`` is not initialised)."""
    if group is None or not _initialized():
        return ""
    return group.group_name


def resolve_group(name: str | None):
    """Inverse of :func:`group_name`: the ProcessGroup called ``name`` (None for ``""``)."""
    if not name:
        return None
    if not _initialized():
        raise ValueError(f"process group {name!r} is not usable: torch.distributed is not initialised")
    try:
        return dist.distributed_c10d._resolve_process_group(name)
    except RuntimeError as exc:
        raise ValueError(f"process group {name!r} was destroyed (destroy_process_group) or never registered") from exc


def _portable(group) -> bool:
    return dist.get_backend(group) in PORTABLE_BACKENDS


def _words(t: torch.Tensor, word: torch.dtype, *, written: bool = False) -> torch.Tensor:
    """The bytes of contiguous ``t`` as a 1-D tensor of ``word``: the same storage, or for an
    input whose storage offset is not a whole number of words, a copy. ``written``: ``t`` is a
    collective's output, which must be viewed in place (a copy would drop what is received)."""
    b = t.reshape(-1).view(torch.uint8)
    try:
        return b.view(word)
    except RuntimeError:
        if written:
            raise RuntimeError(f"cpattn.comm: an output buffer at byte offset {t.storage_offset() * t.element_size()} "
                               f"cannot be viewed as {word}; pass a word-aligned buffer") from None
        return b.clone().view(word)


def _word_for(nbytes: int) -> torch.dtype:
    return torch.int32 if nbytes % 4 == 0 else torch.int8


def _out_buffer(op: str, out: torch.Tensor | None, numel: int, like: torch.Tensor) -> torch.Tensor:
    """``out`` (a caller's preallocated buffer: contiguous, ``like``'s dtype and device, exactly
    ``numel`` elements) flattened, or a new one."""
    if out is None:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    if out.numel() != numel or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous {like.dtype} buffer of {numel} elements on {like.device}; "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out.view(-1)


def _copy_into(op: str, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into the caller's buffer ``out`` (checked as :func:`_out_buffer`), shaped as ``t``."""
    return _out_buffer(op, out, t.numel(), t).copy_(t.reshape(-1)).view(t.shape)


def all_gather(t: torch.Tensor, group=None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, *t.shape]``: every rank's ``t`` (same shape on all ranks), through a flat buffer
    (``out``: a preallocated one of ``N * t.numel()`` elements, written and returned as a view)."""
    n = world_size(group)
    if n == 1:
        return t.unsqueeze(0) if out is None else _copy_into("all_gather", out, t).view(1, *t.shape)
    src = t.contiguous()
    flat = _out_buffer("all_gather", out, n * src.numel(), src)
    if not _portable(group):
        _all_gather_flat(flat, src.view(-1), group=group)
        return flat.view(n, *src.shape)
    word = _word_for(src.numel() * src.element_size())
    out, inp = _words(flat, word, written=True), _words(src, word)
    if n in _FLAT_WORLD_UNSUPPORTED:  # the list form, into views of the flat buffer
        dist.all_gather(list(out.view(n, inp.numel()).unbind(0)), inp, group=group)
    else:
        _all_gather_flat(out, inp, group=group)
    return flat.view(n, *src.shape)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks, in place on ``t`` (contiguous); returns ``t``."""
    n = world_size(group)
    if n == 1:
        return t
    if not _portable(group) or t.dtype in _ALL_REDUCE_DTYPES:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t
    # e.g. float64 on HCCL: reduce-scatter (all-to-all + local sum), then all-gather; every rank
    # ends with the same bits (each chunk is summed once, by its owner).
    m = -(-t.numel() // n)
    buf = torch.zeros(n * m, dtype=t.dtype, device=t.device)
    buf[: t.numel()] = t.reshape(-1)
    t.view(-1).copy_(all_gather(_sum_blocks(all_to_all(buf, group), n), group).view(-1)[: t.numel()])
    return t


def _sum_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of the ``n`` row blocks of ``blocks``, added in rank order."""
    parts = blocks.view(n, blocks.shape[0] // n, *blocks.shape[1:])
    acc = parts[0].clone()
    for i in range(1, n):
        acc += parts[i]
    return acc


def reduce_scatter_sum(t: torch.Tensor, group=None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``t [N * m, ...]`` summed over ranks; this rank keeps rows ``[rank*m, (rank+1)*m)``
    (``out``: a preallocated ``m * prod(t.shape[1:])``-element buffer for them; the HCCL
    fallback for dtypes it cannot sum still allocates its all-to-all's receive buffer)."""
    n = world_size(group)
    if n == 1:
        return t if out is None else _copy_into("reduce_scatter_sum", out, t)
    src = t.contiguous()
    if _portable(group) and (src.dtype not in _REDUCE_SCATTER_DTYPES or n in _FLAT_WORLD_UNSUPPORTED):
        summed = _sum_blocks(all_to_all(src, group), n)  # the same bytes on the wire as a reduce-scatter
        return summed if out is None else _copy_into("reduce_scatter_sum", out, summed)
    shape = (src.shape[0] // n, *src.shape[1:])
    dst = _out_buffer("reduce_scatter_sum", out, src.numel() // n, src).view(shape)
    _reduce_scatter_flat(dst, src, op=dist.ReduceOp.SUM, group=group)
    return dst


def all_to_all(t: torch.Tensor, group=None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``t [N * m, ...]``: row block ``j`` goes to rank ``j``; returns the blocks received, in rank
    order (block ``i`` came from rank ``i``), in ``out`` when given (a preallocated buffer of
    ``t.numel()`` elements)."""
    n = world_size(group)
    if n == 1:
        return t if out is None else _copy_into("all_to_all", out, t)
    src = t.contiguous()
    out = _out_buffer("all_to_all", out, src.numel(), src).view(src.shape)
    if not _portable(group):
        dist.all_to_all_single(out, src, group=group)
        return out
    block_bytes = src.numel() // n * src.element_size()
    if block_bytes % 4 == 0:  # HCCL publishes all_to_all_single for fp32 only: move the bytes as fp32
        dist.all_to_all_single(_words(out, torch.float32, written=True), _words(src, torch.float32), group=group)
        return out
    # Blocks that are no whole number of fp32 words: one batch of point-to-point transfers
    # (HCCL publishes P2P for every dtype); this rank's own block is a local copy.
    me, ins, outs = rank(group), _words(src, torch.uint8).view(n, -1), _words(out, torch.uint8, written=True).view(n, -1)
    to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    ops = []
    for j in range(n):
        if j != me:
            ops.append(dist.P2POp(dist.isend, ins[j], to_global(j), group=group))
            ops.append(dist.P2POp(dist.irecv, outs[j], to_global(j), group=group))
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    outs[me].copy_(ins[me])
    return out


def all_to_all_uneven(t: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None) -> torch.Tensor:
    """``t [sum(send_counts), ...]``: the next ``send_counts[j]`` rows go to rank ``j``; returns
    ``[sum(recv_counts), ...]``, the rows received, in rank order (``recv_counts[i]`` from rank
    ``i``). Counts are host ints that every pair of ranks must agree on (rank ``i``'s
    ``send_counts[j]`` is rank ``j``'s ``recv_counts[i]``). World size 1: returns ``t``."""
    n = world_size(group)
    if len(send_counts) != n or len(recv_counts) != n:
        raise ValueError(f"all_to_all_uneven: need {n} send and receive counts; got {len(send_counts)}, {len(recv_counts)}")
    if n == 1:
        return t
    src = t.contiguous()
    out = torch.empty((sum(recv_counts), *src.shape[1:]), dtype=src.dtype, device=src.device)
    dist.all_to_all_single(out, src, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
                           group=group)
    return out


class RingComm:
    """Pass-KV ring: send to ``rank + 1``, receive from ``rank - 1``, with batched isend/irecv.

    Usage per step: ``nxt = ring.send_recv(cur)``, ``ring.commit()``, compute on ``cur``,
    ``ring.wait()``, then ``cur = nxt``. Both directions of a step go in one
    ``batch_isend_irecv``, so no rank can block the ring (no deadlock at 3+ ranks). Must not be
    used at world size 1 (gloo refuses a send to oneself).
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = rank(group)
        self.world = world_size(group)
        if self.world < 2:
            raise ValueError("RingComm needs at least 2 ranks")
        to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        self.send_to = to_global((self.rank + 1) % self.world)
        self.recv_from = to_global((self.rank - 1) % self.world)
        self._ops: list = []
        self._reqs: list = []
        self.bytes_sent = 0

    def send_recv(self, to_send: torch.Tensor, recv_buf: torch.Tensor | None = None) -> torch.Tensor:
        """Queue sending ``to_send`` (contiguous) and receiving a tensor of the same shape."""
        buf = torch.empty_like(to_send) if recv_buf is None else recv_buf
        self._ops.append(dist.P2POp(dist.isend, to_send, self.send_to, group=self.group))
        self._ops.append(dist.P2POp(dist.irecv, buf, self.recv_from, group=self.group))
        self.bytes_sent += to_send.numel() * to_send.element_size()
        return buf

    def commit(self) -> None:
        if self._ops:
            self._reqs = dist.batch_isend_irecv(self._ops)
            self._ops = []

    def wait(self) -> None:
        for r in self._reqs:
            r.wait()
        self._reqs = []


def _fingerprint(value: Any) -> int:
    """Stable 63-bit hash of a value made of ints, floats, strings, tuples, lists and tensors."""
    if isinstance(value, torch.Tensor):
        value = ("tensor", str(value.dtype), tuple(value.shape), value.detach().cpu().reshape(-1).tolist())
    data = repr(value).encode()
    return (zlib.crc32(data) << 31 | zlib.adler32(data)) & ((1 << 62) - 1)


_calls: dict[str, int] = {}


def next_call(group=None) -> int:
    """Take this rank's next call number on ``group``: every public collective entry point (each
    one-call op, each plan constructor and ``plan()``) takes exactly one, first thing, before any
    check can fail, and sends it through :func:`agree`. Ranks whose numbers differ are out of
    step (a rank skipped or abandoned a call): the agreement then raises on every rank instead of
    pairing the collectives of two different calls."""
    key = _call_key(group)
    _calls[key] = _calls.get(key, 0) + 1
    return _calls[key]


def _call_key(group) -> str:
    """One counter per process group, whether it is passed as None or by its object."""
    if not _initialized():
        return ""
    g = dist.group.WORLD if group is None else group
    return getattr(g, "group_name", "") or ""


def _resync(group, value: int) -> None:
    key = _call_key(group)
    _calls[key] = max(_calls.get(key, 0), value)


def agree(op: str, error: BaseException | None, fields: dict[str, Any], group=None, seq: int | None = None) -> None:
    """Make every rank raise when any rank refused its input or ranks disagree on ``fields``.

    Each rank calls this with the exception its local validation raised (or None), the values
    that must be equal on all ranks, and ``seq``, its call number from :func:`next_call` (None:
    not checked). One small all-gather; on the error path, one more to share the messages. At
    world size 1 it only re-raises ``error``. Must be called by every rank of ``group`` with the
    same field names in the same order (it is a collective).

    Checks, in order: call numbers (ranks out of step: :class:`CollectiveInputError` on every rank,
    and every rank's counter moves to the largest so the next call is in step again), refused
    input (the refusing rank re-raises its own error, the others get a
    :class:`CollectiveInputError` naming it), then each field (every differing field is named, in
    the order given).
    """
    n = world_size(group)
    if n == 1:
        if error is not None:
            raise error
        return
    names = list(fields)
    local = [-1 if seq is None else seq, 1 if error is not None else 0, _fingerprint(op)]
    local += [_fingerprint(fields[k]) for k in names]
    t = torch.tensor(local, dtype=torch.int64, device=_comm_device(group))
    table = all_gather(t, group).cpu().tolist()
    seqs = [row[0] for row in table]
    if seq is not None and len(set(seqs)) > 1:
        _resync(group, max(seqs))
        at = ", ".join(f"rank {r} at call {s}" for r, s in enumerate(seqs))
        raise CollectiveInputError(
            f"{op}: ranks are out of step on group {_label(group) if group is not None else 'default'} ({at}): a rank "
            f"skipped or abandoned an earlier call, so this call would pair with another one; nothing was computed. "
            f"Every rank raises; the call counters are re-synchronised, so the next call on every rank is in step")
    bad_ranks = [r for r in range(n) if table[r][1]]
    if bad_ranks:
        msgs: list = [None] * n
        dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {msgs[r]}" for r in bad_ranks)
        raise CollectiveInputError(f"{op}: input refused on rank(s) {bad_ranks}: {detail}")
    if len({row[2] for row in table}) > 1:
        raise CollectiveInputError(f"{op}: ranks are calling different cpattn operations at the same time on this "
                                   f"group; every rank must make the same calls in the same order")
    diffs = []
    for i, k in enumerate(names, start=3):
        vals = [table[r][i] for r in range(n)]
        if len(set(vals)) > 1:
            groups: dict[int, list[int]] = {}
            for r, v in enumerate(vals):
                groups.setdefault(v, []).append(r)
            split = " vs ".join(f"ranks {rs}" for rs in groups.values())
            diffs.append(f"{k} must be the same on every rank; it differs ({split})")
    if diffs:
        raise CollectiveInputError(f"{op}: " + "; and ".join(diffs))
