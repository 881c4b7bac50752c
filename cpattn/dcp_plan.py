"""``DcpDecodePlan``: DCP decode for serving, planned once per step and run once per layer.

``plan()`` does all host work of a step (validation, the every-rank agreement with its call
number, this rank's local and per-query visible lengths) and fills fixed device buffers with one
host-to-device copy; ``run()`` does device work only (the local kernel, the query-head gather of
``heads="sharded"`` and the combine's collectives): no host sync, no agreement, no allocation
sized by data, so it can be captured in a CUDA graph and compiled with ``fullgraph=True``.
:func:`cpattn.dcp_decode_attention` is a plan sized to its inputs, planned and run once.
Engine wiring: ``docs/serving.md``.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch

from . import _validate as V
from . import comm, dcp_combine, dcp_meta, dcp_workspace
from .backends import select
from .backends.hostsync import no_host_reads

__all__ = ["DcpDecodePlan"]

OP = "DcpDecodePlan"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_PLANS: "weakref.WeakValueDictionary[str, DcpDecodePlan]" = weakref.WeakValueDictionary()
_ids = itertools.count()


@dataclass(frozen=True)
class Config:
    """The static facts of a plan (validated; the same on every rank)."""

    world: int
    rank: int
    num_heads: int  # total query heads
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    block_size: int
    mla: bool
    interleave: int
    heads: str
    combine: str  # the strategy used (the default resolved)
    scale: float
    max_num_seqs: int
    max_num_tokens: int
    max_blocks_per_seq: int
    dtype: torch.dtype
    device: torch.device
    backend: str | None
    kernel_backend: str  # the backend chosen for the local kernel
    merge_backend: str | None  # and for the combine's merge (None at world size 1)

    @property
    def heads_in(self) -> int:
        """Query heads each rank passes to ``run``."""
        return self.num_heads // self.world if self.heads == "sharded" else self.num_heads

    def fields(self) -> dict:
        """What every rank must agree on, in the order differences are reported."""
        return {"heads": self.heads, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "v_head_dim": self.v_head_dim, "mla": self.mla,
                "block_size": self.block_size, "interleave": self.interleave, "combine": self.combine,
                "scale": self.scale, "dtype": str(self.dtype),
                "max sizes (seqs, tokens, blocks)": (self.max_num_seqs, self.max_num_tokens, self.max_blocks_per_seq),
                "backend (requested, kernel, merge)": (self.backend, self.kernel_backend, self.merge_backend)}


def _flag(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{OP}: {name} must be a bool; got {type(x).__name__}")
    return x


def make_config(group, *, num_heads, num_kv_heads, head_dim, block_size, v_head_dim=None, mla=False, interleave=1,
                heads="replicated", combine=None, scale=None, max_num_seqs, max_num_tokens=None, max_blocks_per_seq,
                dtype, device, backend=None, op: str = OP) -> Config:
    """Local validation of a plan's static facts (no collective); raises TypeError/ValueError
    naming the argument, or :class:`cpattn.BackendError`."""
    comm.check_group(op, group)
    n, r = comm.world_size(group), comm.rank(group)
    for name, x in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("block_size", block_size), ("interleave", interleave), ("max_num_seqs", max_num_seqs),
                    ("max_blocks_per_seq", max_blocks_per_seq)):
        V.positive_int(op, name, x)
    if max_num_tokens is None:
        max_num_tokens = max_num_seqs
    V.positive_int(op, "max_num_tokens", max_num_tokens)
    _flag("mla", mla)
    if not isinstance(heads, str) or heads not in ("replicated", "sharded"):
        raise ValueError(f"{op}: heads must be 'replicated' or 'sharded'; got {heads!r}")
    if combine is not None and (not isinstance(combine, str) or combine not in dcp_combine.allowed(heads)):
        raise ValueError(f"{op}: combine={combine!r} is not available with heads={heads!r}; choose one of "
                         f"{dcp_combine.allowed(heads)} (or None for the default)")
    if block_size % interleave:
        raise ValueError(f"{op}: interleave ({interleave}) must divide the cache block_size ({block_size}); "
                         f"use 1 or {block_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{op}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if heads == "sharded" and num_heads % n:
        raise ValueError(f"{op}: heads='sharded' needs num_heads ({num_heads}) divisible by the group size ({n})")
    if mla:
        if v_head_dim is None:
            raise ValueError(f"{op}: v_head_dim is required with mla=True (V = first v_head_dim channels of K)")
        V.positive_int(op, "v_head_dim", v_head_dim)
        if v_head_dim > head_dim:
            raise ValueError(f"{op}: v_head_dim ({v_head_dim}) must be <= head_dim ({head_dim}) with mla=True")
    elif v_head_dim is None:
        v_head_dim = head_dim
    else:
        V.positive_int(op, "v_head_dim", v_head_dim)
    sc = V.scale_value(op, scale, head_dim)
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES:
        raise TypeError(f"{op}: dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    if not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{op}: device must be a torch.device or str; got {type(device).__name__}")
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError(f"{op}: device 'meta' holds no values; plan on the device the cache lives on")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str or None; got {type(backend).__name__}")
    # choose the kernels now, on stand-in tensors of the real dtypes/device: refuse before any collective
    q = torch.empty(1, num_heads, head_dim, dtype=dtype, device=device)
    device = q.device  # with its index ("cuda" -> "cuda:0"): what run()'s tensors will report
    kc = torch.empty(1, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    vc = None if mla else torch.empty(1, block_size, num_kv_heads, v_head_dim, dtype=dtype, device=device)
    one = torch.ones(1, dtype=torch.int32, device=device)
    be = select("paged_attention", backend, dict(
        q=q, k_cache=kc, v_cache=vc, block_table=one.view(1, 1), query_start_loc=torch.arange(2, device=device),
        visible_lens=one, scale=sc, v_head_dim=v_head_dim, max_query_len=1, max_kv_len=1))
    merge_be = None
    if n > 1:
        s = num_heads // n if heads == "sharded" else num_heads
        o = torch.empty(1, s, v_head_dim, dtype=dtype, device=device)
        lz = torch.empty(1, s, dtype=torch.float32, device=device)
        merge_be = select("merge", backend, {"outs": [o] * n, "lses": [lz] * n, "out": o, "out_lse": lz}).name
    strategy = combine or dcp_combine.default_strategy(heads, n, max_num_tokens, num_heads, v_head_dim, dtype)
    return Config(n, r, num_heads, num_kv_heads, head_dim, v_head_dim, block_size, mla, interleave, heads, strategy,
                  sc, max_num_seqs, max_num_tokens, max_blocks_per_seq, dtype, device, backend, be.name, merge_be)


class DcpDecodePlan:
    """DCP decode attention for a serving step loop: ``plan()`` once per step, ``run()`` once per layer.

    Every rank of ``group`` constructs its plans, and calls ``plan()``, in the same order (each is a
    collective: an every-rank agreement). ``run()`` is collective only through the combine.

    Args (all keyword-only after ``group``; the static facts, the same on every rank):
        group: the DCP ProcessGroup (None: the default group, or one process).
        num_heads: TOTAL query heads ``Hq`` (``heads="sharded"``: each rank passes ``Hq/N`` to ``run``).
        num_kv_heads: ``Hkv`` of the cache (``Hq % Hkv == 0``); 1 for MLA.
        head_dim: ``Dqk``; block_size: the cache's tokens per block.
        v_head_dim: ``Dv`` (default ``head_dim``; required with ``mla``, ``<= head_dim``).
        mla: V is the first ``v_head_dim`` channels of K (``run`` gets ``v_cache=None``).
        interleave: DCP interleave size, divides ``block_size``.
        heads: ``"replicated"`` or ``"sharded"``; combine: as :func:`cpattn.dcp_decode_attention`
            (None: :func:`cpattn.dcp_combine.default_strategy` at ``max_num_tokens``).
        scale: softmax scale (default ``1/sqrt(head_dim)``).
        max_num_seqs, max_num_tokens (default ``max_num_seqs``), max_blocks_per_seq: the sizes
            every buffer is allocated at, once (``run``'s ``q`` may have up to ``max_num_tokens`` rows).
        dtype: the query/cache dtype (float32, bfloat16, float16); device: where the cache lives.
        backend: kernel backend name or None (automatic); chosen here, agreed by every rank.

    The constructor allocates the step metadata buffers and :attr:`workspace` (the combine's
    send/receive buffers, the local kernel's scratch, ...; :mod:`cpattn.dcp_workspace`) at these
    maximum sizes; ``run`` reuses them on every layer, so one plan's ``run`` calls must not be in
    flight on two streams at once.

    Raises (construction): TypeError / ValueError naming the argument on EVERY rank (through the
    agreement; ranks with good input get :class:`cpattn.comm.CollectiveInputError`), also when
    ranks disagree on any static fact or the backends chosen; RuntimeError naming the sizes on a
    rank that cannot allocate the buffers (CollectiveInputError on the others).
    """

    def __init__(self, group, *, num_heads, num_kv_heads, head_dim, block_size, v_head_dim=None, mla=False,
                 interleave=1, heads="replicated", combine=None, scale=None, max_num_seqs, max_num_tokens=None,
                 max_blocks_per_seq, dtype, device, backend=None):
        if comm.is_process_group(group):
            comm.check_group(OP, group)  # a destroyed group: no collective is possible, raise here
        agree_group = group if comm.is_process_group(group) else None  # a non-group: agree on the default one
        seq = comm.next_call(agree_group)
        err, cfg = None, None
        try:
            cfg = make_config(group, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              block_size=block_size, v_head_dim=v_head_dim, mla=mla, interleave=interleave,
                              heads=heads, combine=combine, scale=scale, max_num_seqs=max_num_seqs,
                              max_num_tokens=max_num_tokens, max_blocks_per_seq=max_blocks_per_seq, dtype=dtype,
                              device=device, backend=backend)
            self._setup(group, cfg)  # allocates: a failure reaches the agreement too
        except Exception as exc:  # every error reaches the agreement
            err = exc
        comm.agree(OP, err, _config_fields(cfg), agree_group, seq)

    @classmethod
    def _from_config(cls, group, cfg: Config) -> "DcpDecodePlan":
        """A plan without the construction agreement (the one-call op agrees once, in its plan step)."""
        self = cls.__new__(cls)
        self._setup(group, cfg, reserve=False)  # one call: the kernel's scratch at the call's own size
        return self

    def _setup(self, group, cfg: Config, reserve: bool = True) -> None:
        self.group = group
        self.config = cfg
        self._backend = _get(cfg.kernel_backend)
        self._merge_backend = None if cfg.merge_backend is None else _get(cfg.merge_backend)
        try:
            self._meta = dcp_meta.allocate(cfg.world, cfg.rank, cfg.interleave, cfg.block_size, cfg.max_num_seqs,
                                           cfg.max_num_tokens, cfg.max_blocks_per_seq, cfg.device)
            #: The buffers ``run`` reuses on every call (:mod:`cpattn.dcp_workspace`), allocated here.
            self.workspace = dcp_workspace.allocate(
                world=cfg.world, strategy=cfg.combine, heads=cfg.heads, max_tokens=cfg.max_num_tokens,
                num_heads=cfg.num_heads, head_dim=cfg.head_dim, v_head_dim=cfg.v_head_dim, dtype=cfg.dtype,
                partial_dtype=dcp_combine.partial_dtype(cfg.dtype), device=cfg.device)
            if reserve:
                dcp_meta.reserve(self._meta, self._backend, self.workspace.kernel, num_heads=cfg.num_heads,
                                 num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, v_head_dim=cfg.v_head_dim,
                                 dtype=cfg.dtype, mla=cfg.mla)
        except (RuntimeError, MemoryError) as exc:
            raise RuntimeError(f"{OP}: cannot allocate the plan's buffers on {cfg.device} for max_num_tokens="
                               f"{cfg.max_num_tokens}, max_num_seqs={cfg.max_num_seqs}, max_blocks_per_seq="
                               f"{cfg.max_blocks_per_seq} (combine {cfg.combine!r}, {cfg.num_heads} heads of "
                               f"{cfg.head_dim}/{cfg.v_head_dim} channels): {exc}") from exc
        #: Use the maximum sizes for the kernels' host bounds in every run (set it for graph
        #: capture on devices other than CUDA; CUDA capture is detected automatically).
        self.static_bounds = False
        self._key = f"dcp{next(_ids)}"
        _PLANS[self._key] = self

    # ------------------------------------------------------------------ host side, once per step
    def plan(self, seq_lens: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor | None = None):
        """Once per step, on every rank: validate, agree, and fill the plan's buffers.

        Args:
            seq_lens: ``[B]`` int32/int64 GLOBAL lengths (query tokens included), the same on every
                rank; ``B <= max_num_seqs``. CPU or device tensors.
            block_table: ``[B, <= max_blocks_per_seq]`` int32/int64, this rank's blocks of each
                request's local sequence (ids must exist in the cache ``run`` gets).
            query_start_loc: ``[B+1]`` cumulative query-token counts (request ``b`` owns rows
                ``qsl[b]:qsl[b+1]`` of ``q``, its last ``n_b`` tokens); None: one token each.
                ``T = qsl[-1] <= max_num_tokens``.

        Raises TypeError/ValueError on EVERY rank when any rank's input is bad or ranks disagree
        (lengths, call order); the buffers keep the previous step's values then.
        """
        comm.check_group(f"{OP}.plan", self.group)  # destroyed since construction: raise here
        seq = comm.next_call(self.group)
        err, prep = None, None
        try:
            prep = self._prepare(seq_lens, block_table, query_start_loc)
        except Exception as exc:
            err = exc
        comm.agree(f"{OP}.plan", err, self._step_fields(seq_lens, query_start_loc), self.group, seq)
        dcp_meta.commit(self._meta, prep)
        return self

    def _prepare(self, seq_lens, block_table, query_start_loc, num_blocks: int | None = None, op: str = f"{OP}.plan"):
        lens, qsl, T = dcp_meta.request_tokens(op, seq_lens, query_start_loc, self.config.max_num_tokens)
        nq = torch.tensor([b - a for a, b in zip(qsl, qsl[1:])], dtype=torch.int64)
        req = torch.repeat_interleave(torch.arange(lens.shape[0]), nq, output_size=T)
        j = torch.arange(T) - torch.tensor(qsl[:-1], dtype=torch.int64)[req]
        pos = lens[req] - nq[req] + j  # global position of each query token
        return dcp_meta.prepare(self._meta, op, lens, block_table, req, pos + 1, num_blocks)

    def _step_fields(self, seq_lens, query_start_loc) -> dict:
        return {"plan": _fingerprint_cfg(getattr(self, "config", None)),
                "seq_lens": _values(seq_lens), "query_start_loc": _values(query_start_loc)}

    @property
    def num_tokens(self) -> int:
        """``T`` of the last ``plan()`` (host int)."""
        return self._meta.T

    # ------------------------------------------------------------------ device side, once per layer
    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None, return_lse: bool = False):
        """Once per layer: this layer's decode attention with the planned metadata. Device work only.

        Args:
            q: ``[Tp, Hq_in, head_dim]`` (``Hq_in = num_heads``, or ``num_heads/N`` with
                ``heads="sharded"``), ``T <= Tp <= max_num_tokens`` rows; rows past the planned
                ``T`` are padding (a captured graph's bucket) and return zeros with LSE ``-inf``.
            k_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, this layer's shard.
            v_cache: ``[num_blocks, block_size, num_kv_heads, v_head_dim]``; None with ``mla``.
            out: optional ``[Tp, Hq_out, v_head_dim]`` buffer written in place (and returned).
            return_lse: also return ``lse [Tp, Hq_out]`` float32 (natural log).

        Returns ``out [Tp, Hq_out, v_head_dim]`` (``Hq_out = Hq_in``), and the LSE if asked.
        Every rank must pass the same ``Tp``. Shape errors raise here on this rank only (the
        peers then fail in the combine within the group's timeout: docs/reliability.md).
        """
        cfg = self.config
        V.tensor(OP, "q", q, dim=3)
        if q.dtype != cfg.dtype:
            raise TypeError(f"{OP}.run: q must have the plan's dtype {cfg.dtype}; got {q.dtype}")
        if tuple(q.shape[1:]) != (cfg.heads_in, cfg.head_dim):
            raise ValueError(f"{OP}.run: q must be [T, {cfg.heads_in}, {cfg.head_dim}]; got {tuple(q.shape)}")
        if q.device != cfg.device:
            raise ValueError(f"{OP}.run: q is on {q.device}; the plan's buffers are on {cfg.device}")
        if q.shape[0] > cfg.max_num_tokens:
            raise ValueError(f"{OP}.run: q has {q.shape[0]} rows, more than max_num_tokens ({cfg.max_num_tokens})")
        V.tensor(OP, "k_cache", k_cache, dim=4)
        want_k = (cfg.block_size, cfg.num_kv_heads, cfg.head_dim)
        if tuple(k_cache.shape[1:]) != want_k or k_cache.dtype != cfg.dtype or k_cache.device != q.device:
            raise ValueError(f"{OP}.run: k_cache must be [num_blocks, {', '.join(map(str, want_k))}] {cfg.dtype} on "
                             f"{q.device}; got {tuple(k_cache.shape)} {k_cache.dtype} on {k_cache.device}")
        if cfg.mla:
            if v_cache is not None:
                raise ValueError(f"{OP}.run: the plan is mla=True: pass v_cache=None (V = first v_head_dim channels of K)")
        else:
            V.tensor(OP, "v_cache", v_cache, dim=4)
            want_v = (k_cache.shape[0], cfg.block_size, cfg.num_kv_heads, cfg.v_head_dim)
            if tuple(v_cache.shape) != want_v or v_cache.dtype != cfg.dtype or v_cache.device != q.device:
                raise ValueError(f"{OP}.run: v_cache must be {want_v} {cfg.dtype}; got {tuple(v_cache.shape)} "
                                 f"{v_cache.dtype}")
        o, lse = torch.ops.cpattn.dcp_plan_run(q, k_cache, v_cache, self._key)
        if out is not None:
            V.out_tensor(OP, "out", out, shape=o.shape, dtype=o.dtype, device=o.device)
            out.copy_(o)
            o = out
        return (o, lse) if return_lse else o

    def _execute(self, q, k_cache, v_cache):
        """The implementation behind ``torch.ops.cpattn.dcp_plan_run`` (and the one-call op, which
        therefore runs the same no-host-read kernels: on CPU they cost what the host-read
        shortcuts did, docs/performance.md)."""
        m, cfg = self._meta, self.config
        if not m.planned:
            raise RuntimeError(f"{OP}.run: call plan() first (every step, on every rank)")
        Tp = q.shape[0]
        if Tp < m.T:
            raise ValueError(f"{OP}.run: q has {Tp} rows but the plan has {m.T} query tokens")
        if Tp == 0:
            return self.empty_outputs(q)
        static = self.static_bounds or dcp_meta.capturing(q)
        ws = self.workspace
        with no_host_reads():
            q_all = dcp_combine.gather_heads(q, self.group, ws) if cfg.heads == "sharded" else q
            part = dcp_combine.partial_out(ws, cfg.combine, Tp, cfg.num_heads, cfg.v_head_dim, cfg.dtype)
            out, lse = dcp_meta.attend(m, self._backend, q_all, k_cache, v_cache, scale=cfg.scale,
                                       v_head_dim=cfg.v_head_dim, static=static, out=part, workspace=ws.kernel)
            return dcp_combine.combine(out, lse, strategy=cfg.combine, heads=cfg.heads, group=self.group,
                                       backend=self._merge_backend, workspace=ws)

    def empty_outputs(self, q):
        """Outputs of ``run``'s shapes for ``q`` (zeros and ``-inf``: the empty state)."""
        cfg = self.config
        return (q.new_zeros(q.shape[0], cfg.heads_in, cfg.v_head_dim),
                torch.full((q.shape[0], cfg.heads_in), float("-inf"), dtype=torch.float32, device=q.device))


def _get(name: str):
    from .backends import get_backend

    return get_backend(name)


def lookup(key: str) -> DcpDecodePlan:
    plan = _PLANS.get(key)
    if plan is None:
        raise RuntimeError(f"{OP}: plan {key!r} no longer exists (keep the plan object alive while running it)")
    return plan


def _values(x):
    try:
        return None if x is None else tuple(int(v) for v in x.detach().cpu().reshape(-1).tolist())
    except Exception:
        return "?"


def _config_fields(cfg: Config | None) -> dict:
    """The agreed fields; a rank whose validation failed sends the same keys (agree is a collective)."""
    return {k: "?" for k in _DUMMY.fields()} if cfg is None else cfg.fields()


def _fingerprint_cfg(cfg: Config | None):
    return None if cfg is None else tuple(cfg.fields().items())


_DUMMY = Config(1, 0, 1, 1, 1, 1, 1, False, 1, "replicated", "all_gather", 1.0, 1, 1, 1, torch.float32,
                torch.device("cpu"), None, "", None)
