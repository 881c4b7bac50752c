"""N-way LSE merge as one Triton kernel (CUDA; Ascend through triton-ascend; CPU interpreter).

Written to the portable subset that triton-ascend (Triton 3.2 based) accepts: plain pointers and
masks, a 1-D grid of at most 65535 programs (the vector-core count on an NPU) with a persistent
loop over tiles of 16 rows, float32 math right after each load, no autotuning at import, no
``num_warps``/``num_stages`` reliance, and 64-bit arithmetic only on scalars (a tile's base).

Inputs are addressed as ``first`` (input 0) plus ``rest`` (inputs 1..N-1, ``stride_n`` apart), so
a stacked ``[N, ..., D]`` tensor and two separate tensors (the 2-way merge) both run without a
copy; any other list of tensors is stacked once by the host wrapper.

An input whose LSE is ``-inf``, ``+inf`` or NaN gets weight 0 and its ``out`` row is dropped by a
select after the load, so garbage or NaN under an empty LSE cannot leak into the result. Every
load is masked by the rectangle of valid rows and columns of its tile (never by a per-row
bound), which triton-ascend lowers to a bounded copy: nothing past the tensors is read.
With ``nan_propagate`` (DCP/PCP's internal strict rule) a NaN or ``+inf`` input LSE makes the
row NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles

MAX_PROGRAMS = tiles.MAX_PROGRAMS


@triton.jit
def _clean(lse):
    """+inf and NaN mean empty (-inf)."""
    bad = (lse != lse) | (lse == float("inf"))
    return tl.where(bad, float("-inf"), lse)


@triton.jit
def _merge_kernel(
    first_ptr, rest_ptr, stride_n, stride_row,
    lse_first_ptr, lse_rest_ptr, lse_stride_n, lse_stride_row,
    out_ptr, out_stride_row, out_lse_ptr,
    rows, D, N_REST,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NAN_PROPAGATE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r_offs = tl.arange(0, BLOCK_R)
    d_offs = tl.arange(0, BLOCK_D)
    for tile in range(pid, tl.cdiv(rows, BLOCK_R), nprog):
        row0 = tile * BLOCK_R
        rm = r_offs < rows - row0  # valid rows of the tile: a prefix, so every mask below is a rectangle
        row0_64 = tl.cast(row0, tl.int64)  # 64-bit arithmetic on scalars only
        lse0 = lse_first_ptr + row0_64 * lse_stride_row + r_offs * lse_stride_row
        lse_rest = lse_rest_ptr + row0_64 * lse_stride_row + r_offs * lse_stride_row
        l0 = _clean(tl.load(lse0, mask=rm, other=float("-inf")).to(tl.float32))
        m = l0
        for i in range(0, N_REST):
            li = _clean(tl.load(lse_rest + tl.cast(i, tl.int64) * lse_stride_n, mask=rm, other=float("-inf")).to(tl.float32))
            m = tl.maximum(m, li)
        m = tl.where(m == float("-inf"), 0.0, m)
        # Compensated (Kahan) sum of the weights: a plain running sum of N float32 terms can be
        # an ulp off, and every output element inherits that error through the division below.
        total = tl.exp(l0 - m)
        comp = tl.zeros([BLOCK_R], tl.float32)
        for i in range(0, N_REST):
            li = _clean(tl.load(lse_rest + tl.cast(i, tl.int64) * lse_stride_n, mask=rm, other=float("-inf")).to(tl.float32))
            y = tl.exp(li - m) - comp
            t = total + y
            comp = (t - total) - y
            total = t
        # Empty rows (total 0) get weight 0 below; dividing (one rounding), not multiplying by a
        # rounded reciprocal, keeps float32 results within 2x of plain PyTorch's error.
        safe_total = tl.where(total > 0, total, float("inf"))
        # strict mode (DCP/PCP partials): an input LSE of NaN or +inf makes the row NaN
        poison = r_offs < 0
        if NAN_PROPAGATE:
            lr = tl.load(lse0, mask=rm, other=0.0).to(tl.float32)
            poison = (lr != lr) | (lr == float("inf"))
            for i in range(0, N_REST):
                lr = tl.load(lse_rest + tl.cast(i, tl.int64) * lse_stride_n, mask=rm, other=0.0).to(tl.float32)
                poison = poison | (lr != lr) | (lr == float("inf"))
        tl.store(out_lse_ptr + row0_64 + r_offs, tl.where(poison, float("nan"), m + tl.log(total)), mask=rm)
        f0 = tl.exp(l0 - m) / safe_total
        use0 = f0 > 0  # weight 0 (empty, or a padding row): its values are dropped, NaN included
        src0 = first_ptr + row0_64 * stride_row + r_offs[:, None] * stride_row
        rest_rows = rest_ptr + row0_64 * stride_row + r_offs[:, None] * stride_row
        dst = out_ptr + row0_64 * out_stride_row + r_offs[:, None] * out_stride_row
        for d0 in range(0, D, BLOCK_D):
            d = d0 + d_offs
            rect = rm[:, None] & (d[None, :] < D)
            x0 = tl.load(src0 + d[None, :], mask=rect, other=0.0).to(tl.float32)
            acc = tl.where(use0[:, None], x0 * f0[:, None], 0.0)
            for i in range(0, N_REST):
                li = _clean(tl.load(lse_rest + tl.cast(i, tl.int64) * lse_stride_n, mask=rm, other=float("-inf")).to(tl.float32))
                fi = tl.exp(li - m) / safe_total
                x = tl.load(rest_rows + tl.cast(i, tl.int64) * stride_n + d[None, :], mask=rect, other=0.0)
                acc += tl.where(fi[:, None] > 0, x.to(tl.float32) * fi[:, None], 0.0)
            acc = tl.where(poison[:, None], float("nan"), acc)
            tl.store(dst + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=rect)


def _rows(t: torch.Tensor, rows: int, D: int) -> torch.Tensor:
    """``t`` as ``[rows, D]`` with unit stride on D (a view when possible, else a copy)."""
    v = t.reshape(rows, D)
    return v if (D <= 1 or v.stride(1) == 1) else v.contiguous()


def _as_first_rest(ts: list[torch.Tensor], rows: int, D: int):
    """``(first, rest, stride_n, n_rest, keep)``: inputs 1.. must sit ``stride_n`` elements apart
    with input 0's row stride; otherwise they are stacked (one copy). ``keep`` holds every tensor
    the kernel will read (copies made here included) alive until it has run."""
    views = [_rows(t, rows, D) for t in ts]
    n = len(views)
    if n == 1:
        return views[0], views[0], 0, 0, views
    es = views[0].element_size()
    row_strides = {v.stride(0) if rows > 1 else 0 for v in views}
    deltas = [(views[i].data_ptr() - views[1].data_ptr()) for i in range(1, n)]
    step = deltas[1] if n > 2 else 0
    uniform = len(row_strides) == 1 and all(dl == i * step for i, dl in enumerate(deltas)) and step % es == 0
    if uniform:
        return views[0], views[1], step // es, n - 1, views
    stacked = torch.stack(views)  # [N, rows, D] contiguous
    return stacked[0], stacked[1], stacked.stride(0), n - 1, [stacked]


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor], out: torch.Tensor, out_lse: torch.Tensor,
          nan_propagate: bool = False) -> None:
    """The ``merge`` kernel; ``nan_propagate``: the strict rule of DCP/PCP (registry docstring)."""
    D = out.shape[-1]
    rows = out_lse.numel()
    if rows == 0:
        return
    target = out.view(rows, D) if out.is_contiguous() else torch.empty(rows, D, dtype=out.dtype, device=out.device)
    lse_target = out_lse.view(rows) if out_lse.is_contiguous() else torch.empty(rows, dtype=torch.float32,
                                                                                device=out.device)
    first, rest, stride_n, n_rest, keep = _as_first_rest(outs, rows, max(D, 1))
    lfirst, lrest, lstride_n, _, keep_l = _as_first_rest([l.unsqueeze(-1) for l in lses], rows, 1)
    blocks = tiles.merge_blocks(max(D, 1), out.element_size())
    grid = tiles.grid(triton.cdiv(rows, blocks["BLOCK_R"]), out.device, uses_dot=False)
    _merge_kernel[grid](
        first, rest, stride_n, first.stride(0) if rows > 1 else 0,
        lfirst, lrest, lstride_n, lfirst.stride(0) if rows > 1 else 0,
        target, target.stride(0) if rows > 1 else 0, lse_target,
        rows, D, n_rest,
        **blocks,
        NAN_PROPAGATE=bool(nan_propagate),
    )
    del keep, keep_l  # the kernel has been launched on the current stream; safe to release
    if not out.is_contiguous():
        out.copy_(target.view(out.shape))
    if not out_lse.is_contiguous():
        out_lse.copy_(lse_target.view(out_lse.shape))
