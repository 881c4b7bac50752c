"""Block sizes and grid sizes of the Triton kernels (pure host-side arithmetic).

Tiles must fit an Ascend core's unified buffer: 192 KiB, about 96 KiB usable with double
buffering (``../shared/design/brief.md`` section 9). :func:`tile_bytes` estimates what one
iteration of a kernel keeps live (each loaded tile in its storage dtype plus its float32 copy,
and the float32 accumulators and scores) and the block choosers shrink the blocks until that
estimate is within :data:`UB_BUDGET`; what a block does not cover becomes more work items, never
a bigger tile. The same sizes are used on CUDA (a 96 KiB working set is also comfortable
there), so the CPU interpreter checks exactly the tiling that runs on a device.

``UB_BUDGET`` is read at each call, so a test can lower it to make small problems split into
several head and channel chunks. The estimate is ours, not the compiler's: the lowering test (tests/test_triton_ascend_lowering.py)
also bounds every tensor type in the lowered IR.
"""
from __future__ import annotations

import torch
import triton

UB_BUDGET = 96 * 1024
MAX_PROGRAMS = 65535  # triton-ascend's grid limit; plenty on CUDA with a persistent loop
MIN_DOT = 16  # tl.dot needs every dimension >= 16 on CUDA


def _p2(n: int, lo: int = MIN_DOT) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def paged_tile_bytes(bg: int, bn: int, bd: int, bdv: int, elem: int) -> int:
    """Live bytes of one key tile of the paged decode kernel."""
    loaded = (bg * bd + bn * bd + bn * bdv) * (elem + 4)  # q, K, V tiles: raw + float32
    return loaded + 4 * (bg * bdv + 2 * bg * bn + 2 * bg)  # acc, scores + probabilities, m/l


def varlen_tile_bytes(bm: int, bn: int, bd: int, bdv: int, elem: int) -> int:
    """Live bytes of one key tile of the varlen prefill kernel."""
    loaded = (bm * bd + bn * bd + bn * bdv) * (elem + 4)
    return loaded + 4 * (bm * bdv + 2 * bm * bn + 2 * bm + bm + bn)  # + positions


def merge_tile_bytes(br: int, bd: int, elem: int) -> int:
    """Live bytes of one tile of the merge kernel (one input tile, the accumulator, weights)."""
    return br * bd * (elem + 4) + 4 * br * bd + 4 * 6 * br


def _shrink(blocks: dict[str, int], order: list[tuple[str, int]], cost, budget: int) -> dict[str, int]:
    """Halve blocks until ``cost(blocks) <= budget``: each step halves the first block of
    ``order`` (name, floor) still above its floor; stops when none is."""
    blocks = dict(blocks)
    while cost(blocks) > budget:
        for name, floor in order:
            if blocks[name] > floor:
                blocks[name] //= 2
                break
        else:
            break
    return blocks


def paged_blocks(G: int, Dqk: int, Dv: int, block_size: int, elem: int,
                 budget: int | None = None) -> dict[str, int]:
    """``BLOCK_G`` (query heads of one KV head per work item), ``BLOCK_N`` (keys per tile: at
    most one page), ``BLOCK_D`` (Q.K chunk) and ``BLOCK_DV`` (V channels per work item)."""
    budget = UB_BUDGET if budget is None else budget
    bn = min(_p2(block_size), 64)
    bd = min(_p2(Dqk), 64)
    bdv = min(_p2(Dv), 512)
    bg = min(_p2(G), 64)
    # Shrink what costs least first: keys per tile (more iterations), then heads per item (K/V
    # read again per head chunk), then the Q.K chunk, then V channels (scores recomputed per
    # V chunk: the most expensive split).
    return _shrink(dict(BLOCK_G=bg, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv),
                   [("BLOCK_N", MIN_DOT), ("BLOCK_G", MIN_DOT), ("BLOCK_D", 32), ("BLOCK_DV", MIN_DOT),
                    ("BLOCK_D", MIN_DOT)],
                   lambda b: paged_tile_bytes(b["BLOCK_G"], b["BLOCK_N"], b["BLOCK_D"], b["BLOCK_DV"], elem), budget)


def varlen_blocks(Dqk: int, Dv: int, elem: int, device_type: str, budget: int | None = None) -> dict[str, int]:
    """``BLOCK_M`` (query rows per work item), ``BLOCK_N`` (keys per tile), ``BLOCK_D`` and
    ``BLOCK_DV`` (V channels per work item) for the varlen kernel. The interpreter gets the
    smallest tiles (its cost grows with the tile, and small tiles exercise the tile edges)."""
    budget = UB_BUDGET if budget is None else budget
    bm = 16 if device_type == "cpu" else 64
    bn = bm
    bd = min(_p2(Dqk), 64)
    bdv = min(_p2(Dv), 512)
    return _shrink(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv),
                   [("BLOCK_DV", 128), ("BLOCK_N", 32), ("BLOCK_M", 32), ("BLOCK_D", MIN_DOT), ("BLOCK_DV", MIN_DOT)],
                   lambda b: varlen_tile_bytes(b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_D"], b["BLOCK_DV"], elem), budget)


def merge_blocks(D: int, elem: int) -> dict[str, int]:
    br, bd = 16, min(_p2(D), 128)  # 16 x 128 tiles: about 12 KiB, far below any budget
    return dict(BLOCK_R=br, BLOCK_D=bd)


def grid(n_items: int, device: torch.device, *, uses_dot: bool) -> tuple[int]:
    """1-D grid for a persistent kernel over ``n_items`` work items.

    On an Ascend NPU: the AI-core count for kernels with ``tl.dot`` (cube work), the vector-core
    count for vector-only kernels (the merge), from triton-ascend's driver. Elsewhere: one
    program per item up to :data:`MAX_PROGRAMS` (the hardware schedules them)."""
    n = max(1, int(n_items))
    if device.type == "npu":  # pragma: no cover - needs triton-ascend and an NPU
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        cores = props["num_aicore"] if uses_dot else props["num_vectorcore"]
        return (max(1, min(n, int(cores))),)
    return (min(n, MAX_PROGRAMS),)
