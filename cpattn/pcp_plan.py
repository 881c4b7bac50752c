"""``PcpPrefillPlan``: PCP prefill for serving, planned once per batch and run once per layer.

``plan()`` does the host work of a batch (cu_seqlens checks, the head-tail partition, positions,
the ring's per-step key metadata or the all-gather's global order, the cached context's DCP
metadata) and the every-rank agreement; ``run()`` does device work only: the ring's
point-to-point steps (or the all-gather) and the local kernels, no host sync. The all-gather
method also runs inside ``torch.compile(fullgraph=True)``; the ring's point-to-point steps are
meant to run outside a captured graph (piecewise, as vLLM and vllm-ascend run prefill).
:func:`cpattn.pcp_ring_prefill` is this machinery for one call (:func:`prepare`, :func:`execute`).
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch

from . import _validate as V
from . import comm, pcp_context, ring
from .backends import dispatch, get_backend, select
from .backends.hostsync import no_host_reads
from .partition import check_cu_seqlens

__all__ = ["PcpPrefillPlan"]

OP = "PcpPrefillPlan"
METHODS = ("ring", "allgather")
MAX_TOKENS = 2**31 - 1  # positions and row offsets are int32 in the device kernels

_PLANS: "weakref.WeakValueDictionary[str, PcpPrefillPlan]" = weakref.WeakValueDictionary()
_ids = itertools.count()


@dataclass
class PcpStep:
    """One batch's host work: the schedule and the optional cached-context plan."""

    sched: ring.Schedule
    context: object  # PcpContext or None
    ctx_plan: object  # pcp_context.ContextPlan or None (no context, or every context empty)

    def commit(self) -> None:
        if self.ctx_plan is not None:
            self.ctx_plan.commit()


def cu_values(op: str, cu_seqlens) -> tuple[int, ...]:
    """``cu_seqlens`` (tensor or ints) as host ints, refusing meta tensors and absurd totals."""
    if isinstance(cu_seqlens, torch.Tensor):
        V.tensor(op, "cu_seqlens", cu_seqlens, dim=1, dtypes=V.INDEX_DTYPES)
        if cu_seqlens.device.type == "meta":
            raise ValueError(f"{op}: cu_seqlens is on the 'meta' device: its values are needed")
    vals = check_cu_seqlens(op, cu_seqlens)
    if vals and vals[-1] > MAX_TOKENS:
        raise ValueError(f"{op}: cu_seqlens ends at {vals[-1]} tokens, more than {MAX_TOKENS} (2**31 - 1); "
                         f"the batch is too large (or cu_seqlens is corrupt)")
    return vals


def prepare(op: str, vals: tuple[int, ...], context, n: int, r: int, method: str, causal: bool, device) -> PcpStep:
    """All host work of one batch; raises TypeError/ValueError (nothing reaches the device until
    :meth:`PcpStep.commit`)."""
    sched = ring.schedule(vals, n, r, method, causal, device)
    cp = None
    if context is not None:
        lens = pcp_context.validate_static(op, context, len(vals) - 1)
        if any(lens) and vals[-1] > 0:
            cp = pcp_context.plan_context(op, context, lens, vals, sched, device)
    return PcpStep(sched, context, cp)


def empty_outputs(q, v) -> tuple[torch.Tensor, torch.Tensor]:
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    return out, lse


def select_backends(q, k, v, step: PcpStep, causal: bool, scale: float, backend):
    """The attention kernel's Backend (host logic only, refuses before any collective)."""
    be = select("attention", backend, dict(q=q, k=k, v=v, cu_seqlens_q=step.sched.q_cu,
                                           cu_seqlens_k=step.sched.steps[0].k_cu, causal=causal, scale=scale))
    if step.sched.world > 1 or step.ctx_plan is not None:  # the merges' backend too
        o = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        lz = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        select("merge", backend, {"outs": [o, o], "lses": [lz, lz], "out": o, "out_lse": lz})
    return be


def execute(step: PcpStep, q, k, v, *, group, causal: bool, scale: float, backend, attn_backend,
            context_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Device work of one layer: the cached-context part (if any), the ring or all-gather, and
    their merge. ``attn_backend``: the Backend from :func:`select_backends`."""
    sched = step.sched
    if sched.cu[-1] == 0:
        return empty_outputs(q, v)
    ctx_part = None
    if step.ctx_plan is not None:  # first: before the ring, like the one-call op always did
        kc, vc = (step.context.k_cache, step.context.v_cache) if context_cache is None else context_cache
        ctx_part = pcp_context.context_attention(step.ctx_plan, q, kc, vc, group=group, scale=scale,
                                                 dv=v.shape[2], backend=backend, tmax=sched.tmax)
    fn = ring.ring_prefill if sched.method == "ring" else ring.allgather_prefill
    out, lse = fn(q, k, v, sched, group=group, causal=causal, scale=scale, backend=attn_backend,
                  merge_backend=backend)
    if ctx_part is None:
        return out, lse
    merged, merged_lse = empty_outputs(q, v)  # float32 weights and accumulation, one rounding
    inputs = dict(outs=[out, ctx_part[0]], lses=[lse, ctx_part[1]], out=merged, out_lse=merged_lse)
    select("merge", backend, inputs).run("merge", **inputs, nan_propagate=True)  # strict: NaN partials stay NaN
    return merged, merged_lse


class PcpPrefillPlan:
    """PCP prefill for a serving loop: ``plan()`` once per batch, ``run()`` once per layer.

    Every rank of ``group`` constructs its plans and calls ``plan()`` in the same order (each is a
    collective: an every-rank agreement with a call number).

    Args:
        group: the PCP ProcessGroup (None: the default group, or one process).
        method: ``"ring"`` (pass-KV ring) or ``"allgather"`` (all-gather KV); see
            :func:`cpattn.pcp_ring_prefill`.
        causal: causal mask on positions inside each sequence.
        scale: score scale (None: ``1/sqrt(Dqk)`` of ``run``'s ``q``).
        backend: kernel backend name or None (automatic).
        device: where ``plan()`` puts its metadata (None: the group's device: CPU for gloo, the
            current CUDA/NPU device for NCCL/HCCL); ``run``'s tensors must live there.

    Raises (construction, ``plan()``): TypeError / ValueError on EVERY rank, naming the argument;
    :class:`cpattn.comm.CollectiveInputError` on the ranks whose own input was fine.
    """

    def __init__(self, group, *, method="ring", causal=True, scale=None, backend=None, device=None):
        if comm.is_process_group(group):
            comm.check_group(OP, group)  # destroyed: no collective possible, raise here
        agree_group = group if comm.is_process_group(group) else None
        seq = comm.next_call(agree_group)
        err = None
        try:
            comm.check_group(OP, group)
            if not isinstance(method, str) or method not in METHODS:
                raise ValueError(f"{OP}: method must be one of {METHODS}; got {method!r}")
            if not isinstance(causal, bool):
                raise TypeError(f"{OP}: causal must be a bool; got {type(causal).__name__}")
            if scale is not None:
                V.scale_value(OP, scale, 1)
            if backend is not None:
                if not isinstance(backend, str):
                    raise TypeError(f"{OP}: backend must be a str or None; got {type(backend).__name__}")
                get_backend(backend)
            if device is None:
                device = comm._comm_device(group) if comm._initialized() else torch.device("cpu")
            elif not isinstance(device, (str, torch.device)):
                raise TypeError(f"{OP}: device must be a torch.device, str or None; got {type(device).__name__}")
            device = torch.device(device)
            if device.type == "meta":
                raise ValueError(f"{OP}: device 'meta' holds no values")
        except Exception as exc:
            err = exc
        comm.agree(OP, err, {"method": repr(method), "causal": repr(causal), "scale": repr(scale),
                             "backend": repr(backend)}, agree_group, seq)
        self.group, self.method, self.causal, self.backend, self.device = group, method, causal, backend, device
        self.scale = None if scale is None else float(scale)
        self._world, self._rank = comm.world_size(group), comm.rank(group)
        self._step: PcpStep | None = None
        self._key = f"pcp{next(_ids)}"
        _PLANS[self._key] = self

    def plan(self, cu_seqlens, context=None):
        """Once per batch, on every rank: validate, agree and compute everything on the host.

        Args:
            cu_seqlens: ``[B+1]`` int32/int64 (tensor or ints), the GLOBAL packed batch, the same
                on every rank; any lengths >= 0.
            context: optional :class:`cpattn.PcpContext` (cached tokens before each prompt, in the
                DCP layout). Its caches are the ones ``run`` reads, unless ``run`` gets
                ``context_cache`` (a model with one cache per layer).

        Raises TypeError/ValueError on EVERY rank when any rank's input is bad or ranks disagree
        (including call order);
        the previous batch's plan stays in force then.
        """
        comm.check_group(f"{OP}.plan", self.group)
        seq = comm.next_call(self.group)
        err, step, vals = None, None, None
        op = f"{OP}.plan"
        try:
            vals = cu_values(op, cu_seqlens)
            step = prepare(op, vals, context, self._world, self._rank, self.method, self.causal, self.device)
        except Exception as exc:
            err = exc
        comm.agree(op, err, {**pcp_context.fields(context), "cu_seqlens": vals}, self.group, seq)
        step.commit()
        self._step = step
        return self

    def _planned(self) -> PcpStep:
        if self._step is None:
            raise RuntimeError(f"{OP}: call plan() first (every batch, on every rank)")
        return self._step

    @property
    def index(self) -> torch.LongTensor:
        """``[Tr]`` int64 (CPU): this rank's rows of the global batch, ``pcp_partition(...).index``."""
        return self._planned().sched.me.index.clone()

    @property
    def num_tokens(self) -> int:
        """``Tr``: rows this rank holds in the planned batch."""
        return self._planned().sched.me.num_tokens

    def run(self, q, k, v, *, return_lse: bool = False, context_cache=None):
        """Once per layer: this rank's rows of attention over the whole prompt (and the context).

        ``q [Tr, Hq, Dqk]``, ``k [Tr, Hkv, Dqk]``, ``v [Tr, Hkv, Dv]`` in :attr:`index` order,
        one dtype and device; ``context_cache``: optional ``(k_cache, v_cache)`` of this layer
        replacing the planned context's caches (same shapes). Returns ``out [Tr, Hq, Dv]`` (and
        ``lse [Tr, Hq]`` float32 with ``return_lse``), as :func:`cpattn.pcp_ring_prefill`.
        Shape errors raise on this rank only (its peers then fail in the collectives within the
        group's timeout: docs/reliability.md).
        """
        for name, x in (("q", q), ("k", k), ("v", v)):
            V.tensor(f"{OP}.run", name, x, dim=3, dtypes=V.FLOAT_DTYPES)
        V.same(f"{OP}.run", "dtype", {"q": q, "k": k, "v": v}, "dtype")
        V.same_device(f"{OP}.run", {"q": q, "k": k, "v": v})
        if k.shape[2] != q.shape[2] or v.shape[1] != k.shape[1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"{OP}.run: need q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] with Hq % Hkv == 0; got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if context_cache is None:
            o, lse = torch.ops.cpattn.pcp_plan_run(q, k, v, self._key)
        else:  # per-layer cache: plain call (outside the opaque op; for eager serving loops)
            o, lse = self._execute(q, k, v, context_cache=context_cache)
        return (o, lse) if return_lse else o

    def _execute(self, q, k, v, context_cache=None):
        step = self._planned()
        rows = step.sched.me.num_tokens
        if q.shape[0] != rows or k.shape[0] != rows or v.shape[0] != rows:
            raise ValueError(f"{OP}.run: this rank holds {rows} rows of the planned batch; got q {q.shape[0]}, "
                             f"k {k.shape[0]}, v {v.shape[0]}")
        if step.ctx_plan is not None:
            c = step.context
            if context_cache is not None:
                c = pcp_context.PcpContext(*context_cache, c.block_table, c.context_lens, c.interleave)
                if tuple(c.k_cache.shape[:2]) != tuple(step.context.k_cache.shape[:2]):
                    raise ValueError(f"{OP}.run: context_cache must have the planned cache's blocks "
                                     f"{tuple(step.context.k_cache.shape[:2])}; got {tuple(c.k_cache.shape)}")
            pcp_context.check_caches(f"{OP}.run", c, q, k, v)
        scale = V.scale_value(OP, self.scale, q.shape[2])
        with no_host_reads():
            be = select_backends(q, k, v, step, self.causal, scale, self.backend)
            return execute(step, q, k, v, group=self.group, causal=self.causal, scale=scale, backend=self.backend,
                           attn_backend=be, context_cache=context_cache)

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """``[total, ...]``: every rank's ``out`` rows (``[Tr, ...]``) in global token order, on
        every rank (one all-gather; a collective: every rank calls it)."""
        step = self._planned()
        s = step.sched
        if out.shape[0] != s.me.num_tokens:
            raise ValueError(f"{OP}.restore: out must have this rank's {s.me.num_tokens} rows; got {out.shape[0]}")
        if s.world == 1:
            return out
        buf = out.new_zeros(s.tmax, *out.shape[1:])
        buf[: out.shape[0]] = out
        g = comm.all_gather(buf, self.group).reshape(s.world * s.tmax, *out.shape[1:])
        return g.index_select(0, s.order)


def lookup(key: str) -> PcpPrefillPlan:
    plan = _PLANS.get(key)
    if plan is None:
        raise RuntimeError(f"{OP}: plan {key!r} no longer exists (keep the plan object alive while running it)")
    return plan
