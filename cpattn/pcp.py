"""PCP, prefill context parallel: one prompt's attention spread over the ranks of a group.

Public op :func:`pcp_ring_prefill` (also ``torch.ops.cpattn.pcp_ring_prefill``, which takes the
group's name instead of the group). The methods live in :mod:`cpattn.ring`, the token layout in
:mod:`cpattn.partition`; background and pictures in ``docs/pcp.md``.
"""
from __future__ import annotations

import torch

from . import _validate as V
from . import comm, pcp_context, pcp_plan
from .partition import _partition, check_cu_seqlens
from .pcp_context import PcpContext
from .pcp_plan import PcpPrefillPlan

__all__ = ["pcp_ring_prefill", "PcpContext", "PcpPrefillPlan", "METHODS"]

OP = "pcp_ring_prefill"
METHODS = ("ring", "allgather")


def pcp_ring_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    group,
    causal: bool = True,
    scale: float | None = None,
    method: str = "ring",
    return_lse: bool = False,
    backend: str | None = None,
    context: PcpContext | None = None,
):
    """Attention of this rank's prompt tokens over the whole prompt, the prompt spread over ``group``.

    Every rank of ``group`` calls this collectively with its own tokens.

    Args:
        q: ``[Tr, Hq, Dqk]`` this rank's queries, rows in ``pcp_partition(cu_seqlens, N, rank)
            .index`` order (N = size of ``group``).
        k: ``[Tr, Hkv, Dqk]`` and v: ``[Tr, Hkv, Dv]``: this rank's keys and values, same rows.
            ``Hq % Hkv == 0`` (GQA/MQA: query head ``h`` uses KV head ``h // (Hq // Hkv)``; KV
            heads are never repeated, in memory or on the wire). ``Dv`` may differ from ``Dqk``
            (MLA prefill: 192/128). One floating dtype (float32, float16, bfloat16, float64) and
            one device for q, k and v.
        cu_seqlens: ``[B+1]`` int32/int64, the **global** (unsharded) packed batch; the same on
            every rank. Any lengths >= 0: no padding to a multiple of ``2N``.
        group: the ProcessGroup of the ranks sharing the prompt (None: the default group, or a
            single process when ``torch.distributed`` is not initialised: then no collective).
        causal: a query sees the keys of its own sequence at positions ``<=`` its own.
        scale: score scale, ``1/sqrt(Dqk)`` when None.
        method: ``"ring"`` (pass-KV ring, N-1 block transfers overlapped with compute, partials
            merged in float32, float64 for float32/float64 input; KV memory of two blocks) or
            ``"allgather"`` (one all-gather of KV, then local masked attention; KV memory of the
            whole prompt).
        return_lse: also return the LSE.
        backend: local kernel backend (``"pytorch"``, ``"reference"``, ``"triton"``) or None
            (automatic).
        context: optional :class:`cpattn.PcpContext`, this rank's DCP-layout paged cache of the
            tokens cached before each request's prompt (prefix caching, chunked prefill). Request
            ``b``'s prompt then sits at global positions ``context_lens[b] + p`` and every prompt
            query also sees all ``context_lens[b]`` cached tokens; the context part runs through
            :func:`cpattn.dcp_decode_attention` and is merged with the prompt part
            (``docs/pcp.md``). float32/bfloat16/float16 only (the DCP op's dtypes).

    Returns:
        ``out [Tr, Hq, Dv]`` in q's dtype, this rank's rows of attention over the whole prompt
        (gather them with :func:`cpattn.pcp_restore`); with ``return_lse``, also
        ``lse [Tr, Hq]``: float32, natural log, token-major, ``log sum_k exp(scale * q.k)`` over
        every key the row sees, cached context included (cpattn's LSE contract, :mod:`cpattn.lse`;
        every row sees at least itself when causal, so it is finite; a zero-length batch gives
        empty tensors).

    Raises:
        TypeError / ValueError naming the argument, on **every** rank of the group, when any
        rank's input is bad or ranks disagree (cu_seqlens, dtype, head counts, head dims,
        causal, scale, method, backend, context lengths and interleave):
        :class:`cpattn.comm.CollectiveInputError` on the ranks whose own input was fine. Row
        counts that do not match this rank's share (for example a batch partitioned for another
        group size) are refused the same way. Nothing is written; no collective is left waiting.
        :class:`cpattn.BackendError` (on every rank) when the requested backend cannot run it.

    NaN/inf: a row that sees a NaN or inf (its query, or a key or value it sees, cached context
    included) comes out NaN, ``out`` and ``lse``. Any finite ``scale`` works, ``<= 0`` included.
    Forward only: no backward (a backward through the op raises).
    """
    try:
        if group is not None and not comm.is_process_group(group):
            raise TypeError(f"{OP}: group must be a torch.distributed ProcessGroup or None; got {type(group).__name__}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            V.tensor(OP, name, x, dim=3, dtypes=V.FLOAT_DTYPES)
        if isinstance(cu_seqlens, (list, tuple)):
            cu_seqlens = torch.tensor(check_cu_seqlens(OP, cu_seqlens), dtype=torch.int64)
        V.tensor(OP, "cu_seqlens", cu_seqlens, dim=1, dtypes=V.INDEX_DTYPES)
        for name, x in (("causal", causal), ("return_lse", return_lse)):
            if not isinstance(x, bool):
                raise TypeError(f"{OP}: {name} must be a bool; got {type(x).__name__}")
        if scale is not None:
            V.scale_value(OP, scale, 1)
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"{OP}: method must be one of {METHODS}; got {method!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"{OP}: backend must be a str or None; got {type(backend).__name__}")
        if context is not None:
            if not isinstance(context, PcpContext):
                raise TypeError(f"{OP}: context must be a cpattn.PcpContext or None; got {type(context).__name__}")
            for name in ("k_cache", "block_table", "context_lens"):
                V.tensor(OP, f"context.{name}", getattr(context, name))
            if context.v_cache is not None:
                V.tensor(OP, "context.v_cache", context.v_cache)
            V.positive_int(OP, "context.interleave", context.interleave)
    except (TypeError, ValueError) as exc:
        # what the op's schema would refuse: an every-rank error through the agreement (on the
        # default group when ``group`` itself is not a group), never a lone local one
        g = group if comm.is_process_group(group) else None
        seq = comm.next_call(g)
        comm.agree(OP, exc, agreed_fields(q, k, v, cu_seqlens, causal, scale, method, backend, context), g, seq)
        raise  # unreachable: agree re-raises
    c = context
    args = (q, k, v, cu_seqlens, comm.group_name(group), causal, None if scale is None else float(scale), method,
            backend, *((None, None, None, None, 1) if c is None else
                       (c.k_cache, c.v_cache, c.block_table, c.context_lens, c.interleave)))
    devices = {t.device for t in args if isinstance(t, torch.Tensor)}
    # Mixed devices, or "meta" tensors, would make the dispatcher run another device's kernel (the
    # fake one) on this rank only, which skips the agreement the other ranks wait in; run the
    # implementation directly so the error reaches every rank (as dcp_decode_attention).
    direct = len(devices) > 1 or any(d.type == "meta" for d in devices)
    op = run if direct else torch.ops.cpattn.pcp_ring_prefill
    out, lse = op(*args)
    return (out, lse) if return_lse else out


def _safe(fn):
    try:
        return fn()
    except Exception:
        return "?"


def agreed_fields(q, k, v, cu_seqlens, causal, scale, method, backend, context) -> dict:
    """What every rank must agree on; the same keys whatever the input (agree is a collective)."""
    return {
        **pcp_context.fields(context),
        "cu_seqlens": _safe(lambda: tuple(int(x) for x in cu_seqlens.tolist())),
        "causal": _safe(lambda: bool(causal)),
        "scale": _safe(lambda: None if scale is None else float(scale)),
        "method": _safe(lambda: str(method)),
        "backend": _safe(lambda: str(backend)),
        "dtype": _safe(lambda: str(q.dtype)),
        "heads (Hq, Hkv)": _safe(lambda: (q.shape[1], k.shape[1])),
        "head dims (Dqk, Dv)": _safe(lambda: (q.shape[2], v.shape[2])),
    }


def validate_local(q, k, v, cu_seqlens, n: int, r: int, method: str) -> tuple[int, ...]:
    """This rank's checks (no collective); returns cu_seqlens as a tuple of ints."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        V.tensor(OP, name, x, dim=3, dtypes=V.FLOAT_DTYPES)
        if x.device.type == "meta":
            raise ValueError(f"{OP}: {name} is on the 'meta' device: it holds no values to attend over")
    V.same(OP, "dtype", {"q": q, "k": k, "v": v}, "dtype")
    V.same_device(OP, {"q": q, "k": k, "v": v})
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"{OP}: q, k and v must hold the same {q.shape[0]} tokens; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{OP}: k must have q's head dim Dqk={q.shape[2]}; got {k.shape[2]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{OP}: v must have k's {k.shape[1]} heads; got {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{OP}: Hq ({q.shape[1]}) must be a positive multiple of Hkv ({k.shape[1]})")
    if method not in METHODS:
        raise ValueError(f"{OP}: method must be one of {METHODS}; got {method!r}")
    vals = pcp_plan.cu_values(OP, cu_seqlens)
    want = _partition(vals, n, r).num_tokens
    if q.shape[0] != want:
        raise ValueError(
            f"{OP}: rank {r} of {n} holds {want} tokens of this batch (pcp_partition(cu_seqlens, {n}, {r})), "
            f"but q has {q.shape[0]} rows: pass each rank its own rows in pcp_partition order, "
            f"partitioned for this group's size ({n})"
        )
    return vals


def run(q, k, v, cu_seqlens, group_name: str, causal: bool, scale, method: str, backend,
        k_cache=None, v_cache=None, block_table=None, context_lens=None, interleave: int = 1):
    """The op's implementation: validate, agree across ranks, then the machinery of
    :class:`cpattn.PcpPrefillPlan` for one call (:func:`cpattn.pcp_plan.prepare` / ``execute``)."""
    group = comm.resolve_group(group_name)
    seq = comm.next_call(group)
    n, r = comm.world_size(group), comm.rank(group)
    context = None
    if block_table is not None or context_lens is not None or k_cache is not None:
        context = PcpContext(k_cache, v_cache, block_table, context_lens, interleave)
    error, step, attn_be, scale_v = None, None, None, None
    try:
        vals = validate_local(q, k, v, cu_seqlens, n, r, method)
        if context is not None:
            pcp_context.validate(OP, context, q, k, v, len(vals) - 1)
        scale_v = V.scale_value(OP, scale, q.shape[2])
        step = pcp_plan.prepare(OP, vals, context, n, r, method, causal, q.device)
        attn_be = pcp_plan.select_backends(q, k, v, step, causal, scale_v, backend)
    except Exception as exc:  # every error reaches the agreement, whatever its type
        error = exc
    comm.agree(OP, error, agreed_fields(q, k, v, cu_seqlens, causal, scale, method, backend, context), group, seq)
    step.commit()
    return pcp_plan.execute(step, q, k, v, group=group, causal=causal, scale=scale_v, backend=backend,
                            attn_backend=attn_be)


def empty_outputs(q, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Output buffers of the op's shapes (also the fake implementation)."""
    return pcp_plan.empty_outputs(q, v)
