"""Head-tail ("zigzag") partition of a packed varlen batch over N context-parallel ranks.

Every sequence of length ``L`` is cut into ``2N`` chunks; chunk ``c`` covers the positions
``[c*L // (2N), (c+1)*L // (2N))``. Rank ``r`` holds chunk ``r`` (its *head*) and chunk
``2N-1-r`` (its *tail*), in that order, sequence after sequence::

    one sequence, N = 2 (4 chunks)        |  c0  |  c1  |  c2  |  c3  |
                                          rank 0: c0 + c3    rank 1: c1 + c2

Any length works, with no padding: chunks may differ by one token, and a sequence shorter than
``2N`` tokens leaves some chunks empty (a rank may hold nothing of it). Under a causal mask the
work of a head chunk and its mirrored tail chunk add up to the same amount on every rank.

Everything here is a pure function of ``(cu_seqlens, world_size, rank)``, computed on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import torch

__all__ = ["PcpPartition", "pcp_partition", "pcp_chunk_bounds", "pcp_restore", "check_cu_seqlens"]


@dataclass(frozen=True)
class PcpPartition:
    """One rank's share of a packed batch (all tensors int64, on the CPU).

    Attributes:
        world_size, rank: the partition's ``N`` and ``r``.
        cu_seqlens: the global batch, ``(0, L_0, L_0+L_1, ...)`` as a tuple of ints (``B+1``).
        index: ``[Tr]`` the global token indices (rows of the packed batch) this rank holds, in
            the order it holds them: per sequence, its head chunk then its tail chunk.
        positions: ``[Tr]`` each held token's position inside its own sequence (0-based).
        local_cu_seqlens: ``[B+1]`` where each sequence's tokens start in this rank's rows.
        runs: per sequence, the ``((head_start, head_end), (tail_start, tail_end))`` position
            ranges held (empty ranges have ``start == end``).
    """

    world_size: int
    rank: int
    cu_seqlens: tuple[int, ...]
    index: torch.Tensor
    positions: torch.Tensor
    local_cu_seqlens: torch.Tensor
    runs: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    @property
    def num_tokens(self) -> int:
        """``Tr``: how many rows this rank holds."""
        return int(self.index.numel())


def check_cu_seqlens(op: str, cu_seqlens) -> tuple[int, ...]:
    """``cu_seqlens`` as a tuple of ints; ValueError/TypeError naming ``op`` if it is not a 1-D
    integer sequence starting at 0 and never decreasing."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1:
            raise ValueError(f"{op}: cu_seqlens must be 1-D [B+1]; got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: cu_seqlens must be int32 or int64; got {cu_seqlens.dtype}")
        vals = tuple(int(x) for x in cu_seqlens.tolist())
    elif isinstance(cu_seqlens, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in cu_seqlens):
            raise TypeError(f"{op}: cu_seqlens must hold ints")
        vals = tuple(cu_seqlens)
    else:
        raise TypeError(f"{op}: cu_seqlens must be an int tensor or a sequence of ints; got {type(cu_seqlens).__name__}")
    if len(vals) < 1 or vals[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0 (B+1 entries); got {list(vals)[:8]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{op}: cu_seqlens must never decrease (sequence lengths >= 0); got {list(vals)[:16]}")
    return vals


def _check_world_rank(fn: str, world_size, rank) -> None:
    for name, x in (("world_size", world_size), ("rank", rank)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{fn}: {name} must be an int; got {type(x).__name__}")
    if world_size < 1:
        raise ValueError(f"{fn}: world_size must be >= 1; got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{fn}: rank must be in [0, {world_size}); got {rank}")


def pcp_chunk_bounds(length: int, world_size: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The head and tail position ranges that ``rank`` holds of a sequence of ``length`` tokens
    (``length`` an int >= 0, ``0 <= rank < world_size``; TypeError/ValueError otherwise)."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"pcp_chunk_bounds: length must be an int; got {type(length).__name__}")
    if length < 0:
        raise ValueError(f"pcp_chunk_bounds: length must be >= 0; got {length}")
    _check_world_rank("pcp_chunk_bounds", world_size, rank)
    two_n = 2 * world_size

    def bound(c: int) -> int:
        return c * length // two_n

    head = (bound(rank), bound(rank + 1))
    tail = (bound(two_n - 1 - rank), bound(two_n - rank))
    return head, tail


def pcp_partition(cu_seqlens, world_size: int, rank: int) -> PcpPartition:
    """This rank's share of the packed batch described by ``cu_seqlens`` (see the module docstring).

    Args:
        cu_seqlens: ``[B+1]`` int32/int64 tensor (or sequence of ints), the global, unsharded batch.
        world_size: ``N >= 1``, the context-parallel group size.
        rank: ``0 <= rank < N``.

    Returns:
        :class:`PcpPartition`; its ``index`` selects this rank's rows from the packed batch
        (``q_local = q_global[part.index]``), the input layout that :func:`cpattn.pcp_ring_prefill`
        expects.
    """
    vals = check_cu_seqlens("pcp_partition", cu_seqlens)
    _check_world_rank("pcp_partition", world_size, rank)
    part = _partition(vals, world_size, rank)
    # the cached object is shared inside cpattn; hand the caller tensors of its own
    return replace(part, index=part.index.clone(), positions=part.positions.clone(),
                   local_cu_seqlens=part.local_cu_seqlens.clone())


@lru_cache(maxsize=64)
def _partition(vals: tuple[int, ...], world_size: int, rank: int) -> PcpPartition:
    starts, lens, pos_starts, runs = [], [], [], []
    local = [0]
    for b in range(len(vals) - 1):
        length = vals[b + 1] - vals[b]
        head, tail = pcp_chunk_bounds(length, world_size, rank)
        runs.append((head, tail))
        for s, e in (head, tail):
            if e > s:
                starts.append(vals[b] + s)
                pos_starts.append(s)
                lens.append(e - s)
        local.append(local[-1] + (head[1] - head[0]) + (tail[1] - tail[0]))
    index, positions = _expand(starts, pos_starts, lens)
    return PcpPartition(
        world_size=world_size,
        rank=rank,
        cu_seqlens=vals,
        index=index,
        positions=positions,
        local_cu_seqlens=torch.tensor(local, dtype=torch.int64),
        runs=tuple(runs),
    )


def _expand(starts: list[int], pos_starts: list[int], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the ranges ``[s, s+n)`` (and the matching positions) without a Python loop."""
    if not lens:
        e = torch.zeros(0, dtype=torch.int64)
        return e, e.clone()
    n = torch.tensor(lens, dtype=torch.int64)
    total = int(n.sum())
    run_start = torch.cumsum(n, 0) - n  # offset of each run in the output
    offs = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(run_start, n)
    index = torch.repeat_interleave(torch.tensor(starts, dtype=torch.int64), n) + offs
    positions = torch.repeat_interleave(torch.tensor(pos_starts, dtype=torch.int64), n) + offs
    return index, positions


def pcp_restore(per_rank: Sequence[torch.Tensor], cu_seqlens, world_size: int | None = None) -> torch.Tensor:
    """Put per-rank rows back in global order.

    ``per_rank[r]`` is ``[Tr_r, ...]``: rank ``r``'s rows in its :func:`pcp_partition` order (for
    example each rank's output of :func:`cpattn.pcp_ring_prefill`, gathered). Returns
    ``[T, ...]`` with row ``i`` being global token ``i``; dtype and device of ``per_rank[0]``.
    ``world_size`` defaults to ``len(per_rank)``.
    """
    vals = check_cu_seqlens("pcp_restore", cu_seqlens)
    if not isinstance(per_rank, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in per_rank):
        bad = per_rank if not isinstance(per_rank, (list, tuple)) else next(t for t in per_rank if not isinstance(t, torch.Tensor))
        raise TypeError(f"pcp_restore: per_rank must be a list of tensors (one per rank); got {type(bad).__name__}")
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)):
        raise TypeError(f"pcp_restore: world_size must be an int or None; got {type(world_size).__name__}")
    if any(t.dim() < 1 for t in per_rank):
        raise ValueError("pcp_restore: per_rank tensors must be [Tr, ...] (at least 1 dim)")
    n = len(per_rank) if world_size is None else world_size
    if n != len(per_rank) or n < 1:
        raise ValueError(f"pcp_restore: need one tensor per rank ({n}); got {len(per_rank)}")
    first = per_rank[0]
    out = torch.empty((vals[-1], *first.shape[1:]), dtype=first.dtype, device=first.device)
    for r, rows in enumerate(per_rank):
        part = _partition(vals, n, r)
        if rows.shape[0] != part.num_tokens or tuple(rows.shape[1:]) != tuple(first.shape[1:]):
            raise ValueError(
                f"pcp_restore: per_rank[{r}] must be [{part.num_tokens}, {', '.join(map(str, first.shape[1:]))}] "
                f"(rank {r}'s share of this batch over {n} ranks); got {tuple(rows.shape)}"
            )
        out[part.index.to(first.device)] = rows.to(first.dtype)
    return out
