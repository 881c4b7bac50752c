"""Combining the per-rank partial results of DCP decode into the attention over the whole cache.

Every rank holds ``out [T, H, Dv]`` (query dtype) and ``lse [T, H]`` (natural log, float32, or
float64 for float32 queries (:func:`partial_dtype`); ``(0, -inf)`` for a query that saw no local key) for all ``H`` heads over its own shard of the
KV cache. The exact result is their N-way LSE merge (:mod:`cpattn.lse`). Strategies, with the
bytes each rank sends (``N`` ranks, ``e`` bytes per element of the query dtype, ``a`` bytes per
partial LSE and per summed element: 4, or 8 for float32 queries (:func:`partial_dtype`);
``S = H / N``; ``pad_a`` rounds up to a multiple of ``a``; bandwidth-optimal collectives: an
all-gather sends ``(N-1) x`` for ``x`` bytes contributed, a reduce-scatter or all-to-all
``(N-1)/N x`` and an all-reduce ``2 (N-1)/N x`` for ``x`` bytes of input):

``"all_gather"`` (both head modes)
    One all-gather of ``[lse | out]`` packed in one byte buffer, then an N-way merge (of this
    rank's ``S`` heads when sharded). Sends ``(N-1) * pad_a(T*H*(a + Dv*e))``. Simplest, most
    bytes.
``"lse_reduce"`` (both head modes)
    All-gather of the LSEs only (``(N-1) * T*H*a``), each rank rescales its output by
    ``exp(lse_local - lse_global)``, then a sum over ranks in float32 (float64 for float32
    queries): all-reduce when every rank wants all heads (``2 (N-1)/N * T*H*Dv*a``),
    reduce-scatter over heads when sharded (``(N-1)/N * T*H*Dv*a``). Two collectives.
``"all_to_all"`` (sharded only)
    One all-to-all: the slice for rank ``j`` (heads ``jS..(j+1)S-1``) carries its LSE packed
    beside the output; then an N-way merge. Sends ``(N-1) * pad_a(T*S*(a + Dv*e))``.

Sums across ranks happen in float32 at least (the merge kernel accumulates in float32, the
rescaled outputs are float32), in float64 for float32 queries. With ``heads="replicated"`` every
rank ends with bitwise the same result (same inputs to the same merge, or one all-reduce).
:func:`count_bytes` records what each collective sent, so tests can check the formulas above
(:func:`expected_bytes`).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from . import comm
from .backends import Backend, select
from .backends.pytorch.merge import merge as wide_merge
from .backends.pytorch.merge import merge_weights  # the merge's own weights: lse_reduce rescales exactly as it

__all__ = ["STRATEGIES", "ALL_GATHER_MAX_BYTES", "allowed", "default_strategy", "combine", "count_bytes",
           "CommRecord", "expected_bytes", "partial_dtype"]

STRATEGIES = ("all_gather", "lse_reduce", "all_to_all")
_ALLOWED = {"replicated": ("all_gather", "lse_reduce"), "sharded": ("all_gather", "lse_reduce", "all_to_all")}
#: Above this many bytes of all-gathered outputs per rank (``(N-1) * T*H*Dv*e``) the replicated
#: default switches from ``all_gather`` to ``lse_reduce`` (docs/performance.md, DCP section).
ALL_GATHER_MAX_BYTES = 1 << 20


def allowed(heads: str) -> tuple[str, ...]:
    return _ALLOWED[heads]


def default_strategy(heads: str, world: int, T: int, H: int, Dv: int, dtype: torch.dtype) -> str:
    """The strategy used when none is given, from measurements (docs/performance.md):

    * sharded: ``all_to_all`` (one collective, the fewest bytes; fastest, or within noise at
      world 2, at every size measured);
    * replicated: ``all_gather`` (one collective) while its payload ``(N-1) * T*H*Dv*e`` is at
      most :data:`ALL_GATHER_MAX_BYTES`, where latency dominates; beyond it ``lse_reduce``, whose
      float32 all-reduce avoids every rank merging N full outputs.

    The choice depends only on values every rank shares, so all ranks pick the same one.
    """
    if heads == "sharded":
        return "all_to_all"
    e = torch.empty((), dtype=dtype).element_size()
    return "all_gather" if (world - 1) * T * H * Dv * e <= ALL_GATHER_MAX_BYTES else "lse_reduce"


@dataclass(frozen=True)
class CommRecord:
    """One collective: ``purpose`` (``"q_gather"``, ``"combine"``), ``collective``, the bytes
    this rank contributed as input, and the bytes it sent (bandwidth-optimal algorithm)."""

    purpose: str
    collective: str
    bytes_in: int
    bytes_sent: int


_records: contextvars.ContextVar[list | None] = contextvars.ContextVar("cpattn_dcp_records", default=None)


@contextlib.contextmanager
def count_bytes():
    """``with count_bytes() as recs:`` collects a :class:`CommRecord` per DCP collective run
    in this thread inside the block (the metadata check of :func:`cpattn.comm.agree` excluded)."""
    recs: list[CommRecord] = []
    token = _records.set(recs)
    try:
        yield recs
    finally:
        _records.reset(token)


def _note(purpose: str, collective: str, t: torch.Tensor, n: int) -> None:
    recs = _records.get()
    if recs is None:
        return
    x = t.numel() * t.element_size()
    sent = {"all_gather": (n - 1) * x, "all_reduce": 2 * (n - 1) * x // n,
            "reduce_scatter": (n - 1) * x // n, "all_to_all": (n - 1) * x // n}[collective]
    recs.append(CommRecord(purpose, collective, x, sent))


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the partial LSEs exchanged between ranks, and of ``lse_reduce``'s sum, for query
    dtype ``dtype``: float32, or float64 for float32 queries. The public LSE is float32 either
    way; but a float32 LSE of magnitude ~6 is only known to ~2.4e-7, which as a merge weight
    error alone put float32 results past 2x the error of plain float32 PyTorch."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def expected_bytes(strategy: str, heads: str, world: int, T: int, H: int, Dv: int, dtype: torch.dtype) -> int:
    """Bytes one rank sends to combine (the formulas in the module docstring); 0 at world 1."""
    n, e = world, torch.empty((), dtype=dtype).element_size()
    a = torch.empty((), dtype=partial_dtype(dtype)).element_size()  # partial LSE / sum element
    if n == 1:
        return 0
    if strategy == "all_gather":
        return (n - 1) * _pad(T * H * (a + Dv * e), a)
    if strategy == "lse_reduce":
        rest = 2 * (n - 1) * T * H * Dv * a // n if heads == "replicated" else (n - 1) * T * H * Dv * a // n
        return (n - 1) * T * H * a + rest
    if strategy == "all_to_all":
        return (n - 1) * _pad(T * (H // n) * (a + Dv * e), a)
    raise ValueError(f"unknown combine strategy {strategy!r}")


def gather_heads(q: torch.Tensor, group, workspace=None) -> torch.Tensor:
    """``q [T, S, D]`` on each rank -> ``[T, N*S, D]``, rank ``i``'s heads at ``i*S .. i*S+S-1``
    (in ``workspace``'s ``q_gather``/``q_heads`` buffers when given)."""
    n = comm.world_size(group)
    if n == 1:
        return q
    T, S, D = q.shape
    _note("q_gather", "all_gather", q, n)
    g = comm.all_gather(q, group, out=_ws(workspace, "q_gather", (n * T * S * D,), q.dtype))  # [N, T, S, D]
    if workspace is None:
        return g.permute(1, 0, 2, 3).reshape(T, n * S, D)
    dst = workspace.view("q_heads", (T, n, S, D), q.dtype)
    return dst.copy_(g.permute(1, 0, 2, 3)).view(T, n * S, D)


def _ws(workspace, name: str, shape, dtype):
    return None if workspace is None else workspace.view(name, shape, dtype)


def partial_out(workspace, strategy: str, T: int, H: int, Dv: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Where the local kernel may write its partial ``out [T, H, Dv]`` so that :func:`combine`
    moves it without a copy: inside the send buffer (``all_gather``), the workspace's
    ``part_out`` otherwise; None without a workspace or at world size 1."""
    if workspace is None or not workspace.has("send"):
        return None
    if strategy == "all_gather":
        a, e = partial_dtype(dtype).itemsize, dtype.itemsize
        row = workspace.view("send", (_pad(T * H * (a + Dv * e), a),), torch.uint8)
        return _row_views(row.view(1, -1), (T, H), partial_dtype(dtype), (T, H, Dv), dtype)[1][0]
    return workspace.view("part_out", (T, H, Dv), dtype)


def _row_views(rows: torch.Tensor, lse_shape, lse_dtype, out_shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(lse [N, *lse_shape], out [N, *out_shape])`` of the byte rows ``rows [N, bytes]``
    laid out ``[lse | out | pad]`` (rows padded to a multiple of the LSE element size)."""
    n = rows.shape[0]
    nl = lse_dtype.itemsize * _numel(lse_shape)
    no = dtype.itemsize * _numel(out_shape)
    return (rows[:, :nl].view(lse_dtype).view(n, *lse_shape),
            rows[:, nl:nl + no].view(dtype).view(n, *out_shape))


def _pack(lse: torch.Tensor, out: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, bytes]`` rows ``[lse_j | out_j | pad]`` from ``lse [N, ...]`` and ``out [N, ...]``, each
    row padded to a multiple of the LSE element size (so every row's LSE can be viewed in place);
    written into ``dst`` (flat bytes, at least the rows' size) when given, where a part that is
    already in place (the kernel wrote into it) is not copied."""
    n, a = lse.shape[0], lse.element_size()
    nbytes = _pad((lse[0].numel() * a + out[0].numel() * out.element_size()), a)
    rows = (torch.empty(n * nbytes, dtype=torch.uint8, device=out.device) if dst is None else dst[: n * nbytes])
    rows = rows.view(n, nbytes)
    lv, ov = _row_views(rows, lse.shape[1:], lse.dtype, out.shape[1:], out.dtype)
    for src, view in ((lse, lv), (out, ov)):
        if not _same_memory(src, view):
            view.copy_(src)
    pad = nbytes - lse[0].numel() * a - out[0].numel() * out.element_size()
    if pad:
        rows[:, nbytes - pad:].zero_()
    return rows


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are views of the same elements, in the same order."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and all(x == y for x, y, k in zip(a.stride(), b.stride(), a.shape) if k > 1))


def _numel(shape) -> int:
    k = 1
    for s in shape:
        k *= s
    return k


def _merge(outs, lses, backend):
    """N-way merge into a new ``(out, float32 lse)``: float32 partial LSEs on the requested merge
    kernel; float64 ones (float32 queries) on the PyTorch kernel, the one that merges in float64.
    Strict (``nan_propagate``): a partial poisoned by NaN/inf (NaN LSE) makes the row NaN."""
    out = torch.empty(outs[0].shape, dtype=outs[0].dtype, device=outs[0].device)
    lse = torch.empty(outs[0].shape[:-1], dtype=lses[0].dtype, device=outs[0].device)
    inputs = dict(outs=list(outs), lses=list(lses), out=out, out_lse=lse)
    if lses[0].dtype == torch.float64:
        wide_merge(**inputs, nan_propagate=True)
    else:
        be = backend if isinstance(backend, Backend) else select("merge", backend, inputs)
        be.run("merge", **inputs, nan_propagate=True)
    return out, lse.float()


def combine(out: torch.Tensor, lse: torch.Tensor, *, strategy: str, heads: str, group=None,
            backend: str | Backend | None = None, workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine this rank's partial ``(out [T, H, Dv], lse [T, H])`` with the other ranks'.

    ``lse`` is converted to :func:`partial_dtype` of ``out``'s dtype before it is sent. Returns
    ``(out, lse)`` over the whole cache: all ``H`` heads (replicated) or this rank's ``S = H/N``
    heads ``rank*S .. rank*S+S-1`` (sharded); ``out`` in the input dtype, ``lse`` float32. Every
    rank of ``group`` must call it with the same shapes, strategy and heads mode (the public op
    checks this first). ``backend``: the merge kernel's backend, a name (or None: automatic) or a
    :class:`~cpattn.backends.Backend`. ``workspace``: a :class:`cpattn.dcp_workspace.Workspace`
    whose buffers every collective then sends from and receives into (none allocated here;
    the returned tensors are new). World size 1: returned as is, no collective.
    """
    n, r = comm.world_size(group), comm.rank(group)
    if n == 1:
        return out, lse.float()
    T, H, Dv = out.shape
    S = H // n
    pd = partial_dtype(out.dtype)
    ws = workspace
    if strategy == "all_gather":
        send = None if ws is None else ws.buffers["send"]
        packed = _pack(lse.to(pd).unsqueeze(0), out.unsqueeze(0), send)[0]
        _note("combine", "all_gather", packed, n)
        rows = comm.all_gather(packed, group, out=_ws(ws, "recv", (n * packed.numel(),), torch.uint8))  # [N, bytes]
        lses, outs = _row_views(rows, (T, H), pd, (T, H, Dv), out.dtype)
        if heads == "sharded":
            # dense copies of this rank's heads: merge kernels may assume dense inputs
            if ws is None:
                lses, outs = lses[:, :, r * S:(r + 1) * S].contiguous(), outs[:, :, r * S:(r + 1) * S].contiguous()
            else:
                lses = ws.view("merge_lse", (n, T, S), pd).copy_(lses[:, :, r * S:(r + 1) * S])
                outs = ws.view("merge_out", (n, T, S, Dv), out.dtype).copy_(outs[:, :, r * S:(r + 1) * S])
        return _merge(list(outs.unbind(0)), list(lses.unbind(0)), backend)
    if strategy == "lse_reduce":
        mine = lse.to(pd) if ws is None else ws.view("send", (T, H), pd).copy_(lse)
        _note("combine", "all_gather", mine, n)
        lses = comm.all_gather(mine.contiguous(), group, out=_ws(ws, "recv", (n * T * H,), pd))  # [N, T, H]
        frac, lse_all = merge_weights(list(lses.unbind(0)), nan_propagate=True)  # NaN weights: never masked
        w = frac[r]
        if heads == "replicated":
            scaled = torch.mul(out, w[..., None], out=_ws(ws, "scaled", (T, H, Dv), pd)) if ws is not None else \
                out.to(pd).mul_(w[..., None])
            scaled.masked_fill_((w <= 0)[..., None], 0.0)  # empty rows: 0, never NaN
            _note("combine", "all_reduce", scaled, n)
            return comm.all_reduce_sum(scaled, group).to(out.dtype, copy=True), lse_all.float()  # never the buffer
        # by destination: rank j's heads of every token, [N*T, S, Dv]
        w_dest = w.view(T, n, S).transpose(0, 1)[..., None]  # [N, T, S, 1]
        o_dest = out.view(T, n, S, Dv).transpose(0, 1)
        if ws is None:
            by_dest = (o_dest.to(pd) * w_dest).reshape(n * T, S, Dv)
        else:
            by_dest = torch.mul(o_dest, w_dest, out=ws.view("scaled", (n, T, S, Dv), pd)).view(n * T, S, Dv)
        by_dest.view(n, T, S, Dv).masked_fill_(w_dest <= 0, 0.0)
        _note("combine", "reduce_scatter", by_dest, n)
        summed = comm.reduce_scatter_sum(by_dest, group, out=_ws(ws, "summed", (T * S * Dv,), pd))  # [T, S, Dv]
        return summed.to(out.dtype, copy=True), lse_all[:, r * S:(r + 1) * S].float().contiguous()  # a new tensor
    if strategy == "all_to_all":
        if heads != "sharded":
            raise ValueError("combine 'all_to_all' needs heads='sharded'")
        send = None if ws is None else ws.buffers["send"]
        packed = _pack(lse.to(pd).view(T, n, S).transpose(0, 1), out.view(T, n, S, Dv).transpose(0, 1), send)
        _note("combine", "all_to_all", packed, n)
        rows = comm.all_to_all(packed, group, out=_ws(ws, "recv", (packed.numel(),), torch.uint8))  # row i: rank i's
        lses, outs = _row_views(rows.view(n, -1), (T, S), pd, (T, S, Dv), out.dtype)
        return _merge(list(outs.unbind(0)), list(lses.unbind(0)), backend)
    raise ValueError(f"unknown combine strategy {strategy!r}; choose one of {STRATEGIES}")
