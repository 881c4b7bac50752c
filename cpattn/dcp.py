"""DCP (decode context parallel): decode attention over a KV cache sharded across ranks.

Layout: :mod:`cpattn.layout`; combine strategies and their bytes: :mod:`cpattn.dcp_combine`.
"""
from __future__ import annotations

import torch

from . import _validate as V
from . import comm, dcp_combine, dcp_meta, dcp_plan

__all__ = ["dcp_decode_attention", "DcpDecodePlan"]

from .dcp_plan import DcpDecodePlan  # noqa: E402

OP = "dcp_decode_attention"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dcp_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    group,
    query_start_loc: torch.Tensor | None = None,
    interleave: int = 1,
    scale: float | None = None,
    v_head_dim: int | None = None,
    heads: str = "replicated",
    combine: str | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Decode attention of ``q`` against a KV cache sharded over the ranks of ``group`` (DCP).

    Global position ``p`` of every request lives on rank ``(p // interleave) % N`` at local
    position ``(p // (N*interleave)) * interleave + p % interleave`` (:mod:`cpattn.layout`). Each
    rank attends its queries to its own shard, then the partial results are merged exactly with
    their log-sum-exp (:mod:`cpattn.dcp_combine`). Every rank of ``group`` must call it.

    Args:
        q: ``[T, Hq, Dqk]`` float32/bfloat16/float16 query tokens, grouped by request. With
            ``heads="replicated"`` every rank passes the same ``q`` with all ``Hq`` heads; with
            ``heads="sharded"`` rank ``i`` passes heads ``i*Hq/N .. (i+1)*Hq/N - 1`` only
            (``[T, Hq/N, Dqk]``, DCP inside a TP group) and the op gathers them.
        k_cache: ``[num_blocks, block_size, Hkv, Dqk]`` this rank's shard of the keys, dtype and
            device of ``q``; ``Hq % Hkv == 0`` (query head ``h`` uses KV head ``h // (Hq/Hkv)``).
        v_cache: ``[num_blocks, block_size, Hkv, Dv]`` this rank's values, or None for MLA: V is
            then the first ``v_head_dim`` channels of K (one latent KV head, e.g. 512 + 64).
        block_table: ``[B, max_blocks]`` int32 (or int64), rows index this rank's cache blocks
            for its local sequence of each request. Entries past a request's local length are
            never read.
        seq_lens: ``[B]`` int32 (or int64) GLOBAL lengths, query tokens included (the same on
            every rank).
        group: the DCP process group (``None``: the default group, or one process when
            ``torch.distributed`` is not initialised).
        query_start_loc: ``[B+1]`` int32 cumulative query-token counts (request ``b`` owns
            ``q[qsl[b]:qsl[b+1]]``, its last ``n_b`` tokens: speculative decoding, MTP, chunked
            prefill against cached context); None: one token per request (``T == B``).
        interleave: tokens per round-robin run; must divide ``block_size``.
        scale: softmax scale, default ``1/sqrt(Dqk)`` (pass the model's for MLA).
        v_head_dim: ``Dv`` for MLA (required when ``v_cache`` is None; ``<= Dqk``).
        heads: ``"replicated"`` or ``"sharded"`` (see ``q``).
        combine: ``"all_gather"``, ``"lse_reduce"`` or ``"all_to_all"`` (sharded only); None
            picks :func:`cpattn.dcp_combine.default_strategy` (by head mode and payload size).
            All give the same result up to rounding.
        return_lse: also return the LSE.
        backend: local-kernel backend (``"pytorch"``, ``"reference"``, ``"triton"``; None: automatic).

    Returns:
        ``out [T, Hq_out, Dv]`` in ``q``'s dtype, ``Hq_out = Hq`` (replicated) or ``Hq/N``
        (this rank's heads, sharded); with ``return_lse``, also ``lse [T, Hq_out]``: float32,
        natural log, token-major, over the keys at global positions ``<= P`` for a query at
        position ``P`` (the causal rule). A query that sees no key anywhere (not possible for a
        valid decode query) would get ``(0, -inf)``; on a rank where it sees no local key its
        partial is exactly the empty state ``(0, -inf)``, the identity of the merge.
        With ``heads="replicated"`` the results are bitwise identical on every rank.

    Raises:
        TypeError / ValueError naming the argument on EVERY rank (through
        :func:`cpattn.comm.agree`, never a hang) when any rank's input is bad or ranks disagree
        (shapes, dtypes, lengths, interleave, heads, combine, scale); nothing is written.
        :class:`cpattn.BackendError` when the requested backend cannot run the input.

    Reads ``seq_lens``, ``query_start_loc`` and the used block ids on the host (validation and
    the agreement), so the op is not CUDA-graph capturable: a serving loop uses
    :class:`cpattn.DcpDecodePlan` (this op is one built, planned and run for a single call).
    World size 1: no collective at all.

    NaN/inf: a query row that sees a NaN or inf (in its query, or a live cache entry it sees, on
    any rank) comes out NaN, ``out`` and ``lse``, on every rank. Forward only: no backward (a
    backward through the op raises).
    """
    args = (q, k_cache, v_cache, block_table, seq_lens, query_start_loc, group, interleave, scale, v_head_dim, heads,
            combine, return_lse, backend)
    try:
        _check_types(*args)
    except TypeError as exc:
        # what the op's schema would refuse: still an every-rank error (agreed on the default group
        # when ``group`` itself is not a group), never a lone local one that leaves the peers waiting
        g = group if comm.is_process_group(group) else None
        seq = comm.next_call(g)
        comm.agree(OP, exc, _fields(q, k_cache, v_cache, seq_lens, query_start_loc, interleave, heads, combine,
                                    backend, None), g, seq)
        raise
    args = (q, k_cache, v_cache, block_table, seq_lens, query_start_loc, comm.group_name(group), interleave, scale,
            v_head_dim, heads, combine or "", backend)
    devices = {t.device for t in args[:6] if isinstance(t, torch.Tensor)}
    # Mixed devices, or "meta" tensors, would make the dispatcher run another device's kernel (the
    # fake one) on this rank only; run the implementation directly so the error reaches every rank.
    direct = len(devices) > 1 or any(d.type == "meta" for d in devices)
    op = run if direct else torch.ops.cpattn.dcp_decode_attention
    out, lse = op(*args)
    return (out, lse) if return_lse else out


def _check_types(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, group, interleave, scale, v_head_dim,
                 heads, combine, return_lse, backend) -> None:
    """The argument types the op's schema needs (TypeError naming the argument)."""
    if group is not None and not comm.is_process_group(group):
        raise TypeError(f"{OP}: group must be a torch.distributed ProcessGroup or None; got {type(group).__name__}")
    for name, x, optional in (("q", q, False), ("k_cache", k_cache, False), ("v_cache", v_cache, True),
                              ("block_table", block_table, False), ("seq_lens", seq_lens, False),
                              ("query_start_loc", query_start_loc, True)):
        if not (isinstance(x, torch.Tensor) or (optional and x is None)):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor{' or None' if optional else ''}; got {type(x).__name__}")
    for name, x in (("interleave", interleave), ("v_head_dim", v_head_dim)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int)):
            raise TypeError(f"{OP}: {name} must be an int; got {type(x).__name__} ({x!r})")
    if interleave is None:
        raise TypeError(f"{OP}: interleave must be an int; got None")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{OP}: scale must be a float or None; got {type(scale).__name__}")
    if not isinstance(heads, str):
        raise TypeError(f"{OP}: heads must be 'replicated' or 'sharded' (a str); got {heads!r}")
    for name, x in (("combine", combine), ("backend", backend)):
        if x is not None and not isinstance(x, str):
            raise TypeError(f"{OP}: {name} must be a str or None; got {type(x).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{OP}: return_lse must be a bool; got {type(return_lse).__name__}")


def check_shapes(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, v_head_dim, heads, combine) -> int:
    """Local checks that need no tensor values (also the fake implementation's); returns Dv."""
    V.tensor(OP, "q", q, dim=3, dtypes=DTYPES)
    V.tensor(OP, "k_cache", k_cache, dim=4, dtypes=DTYPES)
    V.same(OP, "dtype", {"q": q, "k_cache": k_cache}, "dtype")
    named = {"q": q, "k_cache": k_cache}
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"{OP}: k_cache head dim ({k_cache.shape[3]}) must equal q's Dqk ({q.shape[2]})")
    if v_cache is None:
        if v_head_dim is None:
            raise ValueError(f"{OP}: v_head_dim is required when v_cache is None (MLA: V = first v_head_dim channels of K)")
        V.positive_int(OP, "v_head_dim", v_head_dim)
        if v_head_dim > q.shape[2]:
            raise ValueError(f"{OP}: v_head_dim ({v_head_dim}) must be <= Dqk ({q.shape[2]}) when v_cache is None")
        dv = v_head_dim
    else:
        V.tensor(OP, "v_cache", v_cache, dim=4)
        V.same(OP, "dtype", {"k_cache": k_cache, "v_cache": v_cache}, "dtype")
        if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
            raise ValueError(f"{OP}: v_cache must be [num_blocks, block_size, Hkv, Dv] matching k_cache "
                             f"{tuple(k_cache.shape[:3])}; got {tuple(v_cache.shape)}")
        if v_head_dim is not None and v_head_dim != v_cache.shape[3]:
            raise ValueError(f"{OP}: v_head_dim ({v_head_dim}) disagrees with v_cache's last dim ({v_cache.shape[3]})")
        named["v_cache"] = v_cache
        dv = v_cache.shape[3]
    V.tensor(OP, "block_table", block_table, dim=2, dtypes=V.INDEX_DTYPES)
    V.tensor(OP, "seq_lens", seq_lens, dim=1, dtypes=V.INDEX_DTYPES)
    named.update(block_table=block_table, seq_lens=seq_lens)
    B = seq_lens.shape[0]
    if block_table.shape[0] != B:
        raise ValueError(f"{OP}: block_table must have one row per request ({B}); got {tuple(block_table.shape)}")
    if query_start_loc is None:
        if q.shape[0] != B:
            raise ValueError(f"{OP}: without query_start_loc, q must have one token per request ({B}); got T={q.shape[0]}")
    else:
        V.tensor(OP, "query_start_loc", query_start_loc, dim=1, dtypes=V.INDEX_DTYPES)
        if query_start_loc.shape[0] != B + 1:
            raise ValueError(f"{OP}: query_start_loc must be [B+1] = [{B + 1}]; got {tuple(query_start_loc.shape)}")
        named["query_start_loc"] = query_start_loc
    V.same_device(OP, named)
    if heads not in ("replicated", "sharded"):
        raise ValueError(f"{OP}: heads must be 'replicated' or 'sharded'; got {heads!r}")
    if combine and combine not in dcp_combine.allowed(heads):
        raise ValueError(f"{OP}: combine={combine!r} is not available with heads={heads!r}; choose one of "
                         f"{dcp_combine.allowed(heads)} (or None for the default)")
    return dv


def run(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, group_name_: str, interleave, scale,
        v_head_dim, heads, combine, backend):
    """The implementation behind ``torch.ops.cpattn.dcp_decode_attention``: a
    :class:`cpattn.DcpDecodePlan` sized to these inputs, planned and run once (one agreement)."""
    group = comm.resolve_group(group_name_)
    seq = comm.next_call(group)
    err, plan, prep = None, None, None
    try:
        dv = check_shapes(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, v_head_dim, heads, combine)
        n = comm.world_size(group)
        V.positive_int(OP, "interleave", interleave)
        NB, bs, hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
        if bs % interleave:
            raise ValueError(f"{OP}: interleave ({interleave}) must divide the cache block_size ({bs}); use 1 or {bs}")
        h = q.shape[1] * (n if heads == "sharded" else 1)
        if h == 0:
            raise ValueError(f"{OP}: q has no query heads (shape {tuple(q.shape)}); it needs Hq >= 1")
        if hkv == 0 or h % hkv:
            what = f"{q.shape[1]} per rank x {n} ranks = {h}" if heads == "sharded" else str(h)
            raise ValueError(f"{OP}: query heads ({what}) must be a multiple of k_cache's KV heads ({hkv})")
        cfg = dcp_plan.make_config(
            group, num_heads=h, num_kv_heads=hkv, head_dim=q.shape[2], block_size=bs, v_head_dim=dv,
            mla=v_cache is None, interleave=interleave, heads=heads, combine=combine or None, scale=scale,
            max_num_seqs=max(seq_lens.shape[0], 1), max_num_tokens=max(q.shape[0], 1),
            max_blocks_per_seq=max(block_table.shape[1], 1), dtype=q.dtype, device=q.device, backend=backend, op=OP)
        plan = dcp_plan.DcpDecodePlan._from_config(group, cfg)
        prep = plan._prepare(seq_lens, block_table, query_start_loc, num_blocks=NB, op=OP)
    except Exception as exc:  # every error reaches the agreement, whatever its type
        err = exc
    comm.agree(OP, err, _fields(q, k_cache, v_cache, seq_lens, query_start_loc, interleave, heads, combine, backend,
                                None if plan is None else plan.config), group, seq)
    dcp_meta.commit(plan._meta, prep)
    return plan._execute(q, k_cache, v_cache)


def _fields(q, k_cache, v_cache, seq_lens, query_start_loc, interleave, heads, combine, backend, cfg) -> dict:
    """What every rank must agree on (safe to build from invalid input; the same keys always)."""
    def shape(x):
        return tuple(x.shape) if isinstance(x, torch.Tensor) else None

    def values(x):
        try:
            return tuple(int(v) for v in x.tolist()) if isinstance(x, torch.Tensor) and x.dim() == 1 and \
                x.device.type != "meta" else None
        except Exception:
            return "?"

    return {
        "heads": str(heads),
        "q shape [T, heads, Dqk] (heads='sharded': each rank passes Hq/N heads, Hq divisible by N)": shape(q),
        "q dtype": str(getattr(q, "dtype", None)),
        "k_cache [block_size, Hkv, Dqk]": shape(k_cache)[1:] if shape(k_cache) else None,
        "v head dim": None if cfg is None else cfg.v_head_dim,
        "seq_lens": values(seq_lens),
        "query_start_loc": values(query_start_loc),
        "interleave": repr(interleave),
        "combine": None if cfg is None else cfg.combine,
        "scale": None if cfg is None else cfg.scale,
        "mla (v_cache is None)": v_cache is None,
        "backend (requested, kernel, merge)": (repr(backend), None if cfg is None else cfg.kernel_backend,
                                               None if cfg is None else cfg.merge_backend),
    }
