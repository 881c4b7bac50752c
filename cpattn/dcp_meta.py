"""Per-step DCP metadata: host arithmetic once per step, fixed-address device buffers, no host
sync when the local kernel runs.

Used by :class:`cpattn.DcpDecodePlan` (and through it by :func:`cpattn.dcp_decode_attention`)
and by the cached-context part of PCP. The device side is ONE int32 buffer allocated at the
plan's maximum sizes, holding three views:

``vis [max_tokens]``
    local keys each query token sees on this rank (``local_len(P + 1)`` for a query at global
    position ``P``); 0 for padding rows, so they come out ``(0, -inf)``.
``req [max_tokens]``
    each query token's request (row of ``table``); 0 for padding rows.
``table [max_seqs, max_blocks]``
    this rank's block table.

:func:`prepare` validates and computes everything on the host (into a host staging buffer);
:func:`commit` copies the used prefix to the device buffer with ONE host-to-device copy (the
addresses never change, so a captured CUDA graph keeps reading the current step's values).
:func:`attend` runs the local paged kernel from these buffers: every query token is passed as
its own one-token request (block-table row gathered on the device), so the kernel call has no
data-dependent shape: ``max_query_len = 1`` and its sizes follow ``q``'s (padded) row count only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _validate as V
from . import layout


@dataclass
class Meta:
    """Device buffers of one plan and the host facts of its last :func:`commit`."""

    world: int
    rank: int
    interleave: int
    block_size: int
    max_seqs: int
    max_tokens: int
    max_blocks: int
    device: torch.device
    buf: torch.Tensor = field(repr=False, default=None)  # int32 [2*max_tokens + max_seqs*max_blocks]
    host: torch.Tensor = field(repr=False, default=None)  # staging copy on the host (pinned for CUDA)
    arange: torch.Tensor = field(repr=False, default=None)  # int32 [max_tokens + 1]: 0, 1, 2, ...
    planned: bool = False
    event: object = None  # CUDA event of the last non-blocking copy (the staging buffer is reused)
    T: int = 0  # planned query tokens
    B: int = 0  # planned requests
    max_kv: int = 0  # largest vis over planned tokens (host)
    min_vis: int = 0  # smallest vis over planned tokens (host)

    @property
    def vis(self) -> torch.Tensor:
        return self.buf[: self.max_tokens]

    @property
    def req(self) -> torch.Tensor:
        return self.buf[self.max_tokens: 2 * self.max_tokens]

    @property
    def table(self) -> torch.Tensor:
        return self.buf[2 * self.max_tokens:].view(self.max_seqs, self.max_blocks)


def allocate(world, rank, interleave, block_size, max_seqs, max_tokens, max_blocks, device) -> Meta:
    device = torch.device(device)
    m = Meta(world, rank, interleave, block_size, max_seqs, max_tokens, max_blocks, device)
    size = 2 * max_tokens + max_seqs * max_blocks
    m.buf = torch.zeros(size, dtype=torch.int32, device=device)
    pin = device.type == "cuda" and torch.cuda.is_available()
    m.host = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
    m.arange = torch.arange(max_tokens + 1, dtype=torch.int32, device=device)
    return m


@dataclass
class Prepared:
    """What :func:`prepare` computed on the host; :func:`commit` publishes it."""

    T: int
    B: int
    used: int  # length of the staging prefix to copy
    max_kv: int
    min_vis: int


def _host_ints(op: str, name: str, t, *, dim: int) -> torch.Tensor:
    V.tensor(op, name, t, dim=dim, dtypes=V.INDEX_DTYPES)
    if t.device.type == "meta":
        raise ValueError(f"{op}: {name} is on the 'meta' device: the plan needs its values (pass a CPU or "
                         f"device tensor)")
    return t.detach().to("cpu", torch.int64)


def request_tokens(op: str, seq_lens: torch.Tensor, query_start_loc, max_tokens: int):
    """Host ``(lens [B] int64, qsl list, T)`` from DCP's global ``seq_lens`` and
    ``query_start_loc`` (None: one token per request), with the public op's checks."""
    lens = _host_ints(op, "seq_lens", seq_lens, dim=1)
    B = lens.shape[0]
    if query_start_loc is None:
        qsl = list(range(B + 1))
    else:
        q = _host_ints(op, "query_start_loc", query_start_loc, dim=1)
        if q.shape[0] != B + 1:
            raise ValueError(f"{op}: query_start_loc must be [B+1] = [{B + 1}]; got {tuple(q.shape)}")
        qsl = [int(x) for x in q.tolist()]
    T = qsl[-1] if qsl else 0
    if qsl[0] != 0 or any(b < a for a, b in zip(qsl, qsl[1:])):
        raise ValueError(f"{op}: query_start_loc must start at 0, never decrease and end at T={T}; got {qsl[:16]}")
    if T > max_tokens:
        raise ValueError(f"{op}: {T} query tokens exceed the plan's max_num_tokens ({max_tokens})")
    neg = (lens < 0).nonzero()
    if neg.numel():
        b = int(neg[0])
        raise ValueError(f"{op}: seq_lens[{b}]={int(lens[b])} is negative; seq_lens are global lengths >= 0")
    nq = torch.tensor([b - a for a, b in zip(qsl, qsl[1:])], dtype=torch.int64)
    short = (lens < nq).nonzero()
    if short.numel():
        b = int(short[0])
        raise ValueError(f"{op}: seq_lens[{b}]={int(lens[b])} is shorter than its {int(nq[b])} query token(s); "
                         f"seq_lens are GLOBAL lengths including the query tokens")
    return lens, qsl, T


def prepare(m: Meta, op: str, lens: torch.Tensor, block_table, req: torch.Tensor, vis_global: torch.Tensor,
            num_blocks: int | None = None) -> Prepared:
    """Validate the block table against ``m``'s sizes and write the staging buffer.

    ``lens [B]``: global length of each request's sequence on the cache (host int64);
    ``req [T]``: each query token's request; ``vis_global [T]``: how many global positions
    ``0 .. vis-1`` of its request the token sees. ``num_blocks``: the cache's block count when
    known (block ids are then checked against it). Raises ValueError/TypeError; writes nothing
    to the device.
    """
    n, r, il, bs = m.world, m.rank, m.interleave, m.block_size
    B, T = lens.shape[0], req.shape[0]
    if B > m.max_seqs:
        raise ValueError(f"{op}: {B} requests exceed the plan's max_num_seqs ({m.max_seqs})")
    table = _host_ints(op, "block_table", block_table, dim=2)
    if table.shape[0] != B:
        raise ValueError(f"{op}: block_table must have one row per request ({B}); got {tuple(table.shape)}")
    mb = table.shape[1]
    if mb > m.max_blocks:
        raise ValueError(f"{op}: block_table has {mb} columns, more than the plan's max_blocks_per_seq ({m.max_blocks})")
    if T > m.max_tokens:
        raise ValueError(f"{op}: {T} query tokens exceed the plan's max_num_tokens ({m.max_tokens})")
    local = layout.dcp_local_seq_lens(lens, n, r, il)
    cap = mb * bs
    over = (local > cap).nonzero()
    if over.numel():
        b = int(over[0])
        raise ValueError(
            f"{op}: seq_lens[{b}]={int(lens[b])} puts {int(local[b])} tokens on rank {r} of {n} (interleave {il}) but "
            f"block_table has room for {cap} (max_blocks {mb} x block_size {bs}); lengths "
            f"beyond the block table, or a cache sharded for a different world size")
    used_blocks = -(-local // bs)
    if B and int(used_blocks.max()) > 0:
        live = torch.arange(mb)[None, :] < used_blocks[:, None]
        ids = table[live]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise ValueError(f"{op}: block_table refers to block {lo}; block ids must be >= 0")
        if num_blocks is not None and hi >= num_blocks:
            raise ValueError(f"{op}: block_table refers to block {hi}, outside k_cache's {num_blocks} blocks")
        if hi >= 2**31:
            raise ValueError(f"{op}: block_table refers to block {hi}; block ids must fit int32")
    vis = layout.dcp_local_seq_lens(vis_global, n, r, il)
    if m.event is not None:  # the previous step's copy must have left the staging buffer
        m.event.synchronize()
        m.event = None
    h = m.host
    h[: 2 * m.max_tokens].zero_()
    h[:T] = vis.to(torch.int32)
    h[m.max_tokens: m.max_tokens + T] = req.to(torch.int32)
    tab = h[2 * m.max_tokens: 2 * m.max_tokens + B * m.max_blocks].view(B, m.max_blocks)
    tab.zero_()
    tab[:, :mb] = table.to(torch.int32)
    return Prepared(T, B, 2 * m.max_tokens + B * m.max_blocks, int(vis.max()) if T else 0,
                    int(vis.min()) if T else 0)


def commit(m: Meta, p: Prepared) -> None:
    """Publish a prepared step: one host-to-device copy into the fixed buffer."""
    pinned = m.host.is_pinned()
    m.buf[: p.used].copy_(m.host[: p.used], non_blocking=pinned)
    if pinned:
        m.event = torch.cuda.Event()
        m.event.record()
    m.T, m.B, m.max_kv, m.min_vis, m.planned = p.T, p.B, p.max_kv, p.min_vis, True


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream (for ``t``'s device)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def attend(m: Meta, backend, q, k_cache, v_cache, *, scale: float, v_head_dim: int, start: int = 0,
           stop: int | None = None, static: bool = False, out: torch.Tensor | None = None,
           workspace: dict | None = None):
    """This rank's partial ``(out [t, H, Dv], lse [t, H])`` for query rows ``start:stop`` of the
    plan (``q`` holds exactly those rows; rows at or past the planned ``T`` are padding and get
    ``(0, -inf)``). ``static``: use the plan's maximum sizes for the kernel's host bounds (graph
    capture: the captured kernels must serve any later plan) instead of the current step's.
    ``out``: a buffer for the output (the kernel writes into it when it can, otherwise it is
    copied there); ``workspace``: the kernel's scratch dict, for kernels that take one."""
    stop = q.shape[0] + start if stop is None else stop
    t = stop - start
    table = m.table.index_select(0, m.req[start:stop])  # [t, max_blocks]: each token its own request
    kw = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, query_start_loc=m.arange[: t + 1],
              visible_lens=m.vis[start:stop], scale=scale, v_head_dim=v_head_dim, max_query_len=1,
              max_kv_len=m.max_blocks * m.block_size if static else m.max_kv)
    op = "paged_attention"
    if backend.accepts(op, "min_visible"):
        kw["min_visible"] = 0 if (static or stop > m.T) else m.min_vis
    if workspace is not None and backend.accepts(op, "workspace"):
        kw["workspace"] = workspace
    takes_out = out is not None and backend.accepts(op, "out")
    if takes_out:
        kw["out"] = out
    o, lse = backend.run(op, **kw)
    if out is not None and not takes_out:
        o = out.copy_(o)
    return o, lse


def reserve(m: Meta, backend, workspace: dict, *, num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int,
            dtype: torch.dtype, mla: bool) -> None:
    """Let the local kernel allocate its scratch for every :func:`attend` of this plan, once."""
    k = backend.kernels.get("paged_attention")
    if k is not None and k.reserve is not None:
        k.reserve(workspace, max_tokens=m.max_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  head_dim=head_dim, v_head_dim=v_head_dim, block_size=m.block_size,
                  max_kv_len=m.max_blocks * m.block_size, dtype=dtype, device=m.device, mla=mla)
