"""The one module that touches ``torch.library``: every public op as ``torch.ops.cpattn.<name>``.

Each op has a real implementation (validate, then dispatch to a backend) and a fake one (the
same shape checks, then empty outputs) so that it traces under ``torch.compile`` and passes
``torch.library.opcheck``. Functional ops return new tensors; ``*_out`` variants write into
caller buffers (declared as mutated).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from . import merge as _merge

# ---------------------------------------------------------------- merge_attn_states (2-way)


@custom_op("cpattn::merge_attn_states", mutates_args=())
def merge_attn_states(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, backend: Optional[str] = None
) -> tuple[Tensor, Tensor]:
    out, lse = _merge._out_buffers("merge_attn_states", [out_a, out_b], [lse_a, lse_b], None, None)  # validates
    _merge._run_checked("merge_attn_states", [out_a, out_b], [lse_a, lse_b], out, lse, backend)
    return out, lse


@register_fake("cpattn::merge_attn_states")
def _(out_a, lse_a, out_b, lse_b, backend=None):
    return _merge._out_buffers("merge_attn_states", [out_a, out_b], [lse_a, lse_b], None, None)


@custom_op("cpattn::merge_attn_states_out", mutates_args=("out", "out_lse"))
def merge_attn_states_out(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, out: Tensor, out_lse: Tensor,
    backend: Optional[str] = None,
) -> None:
    _merge.run("merge_attn_states", [out_a, out_b], [lse_a, lse_b], out, out_lse, backend)


@register_fake("cpattn::merge_attn_states_out")
def _(out_a, lse_a, out_b, lse_b, out, out_lse, backend=None):
    _merge.validate("merge_attn_states", [out_a, out_b], [lse_a, lse_b], out, out_lse)


# ---------------------------------------------------------------- merge_attn_states_n (N-way)


@custom_op("cpattn::merge_attn_states_n", mutates_args=())
def merge_attn_states_n(outs: list[Tensor], lses: list[Tensor], backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    out, lse = _merge._out_buffers("merge_attn_states_n", outs, lses, None, None)  # validates
    _merge._run_checked("merge_attn_states_n", outs, lses, out, lse, backend)
    return out, lse


@register_fake("cpattn::merge_attn_states_n")
def _(outs, lses, backend=None):
    return _merge._out_buffers("merge_attn_states_n", outs, lses, None, None)


@custom_op("cpattn::merge_attn_states_n_out", mutates_args=("out", "out_lse"))
def merge_attn_states_n_out(
    outs: list[Tensor], lses: list[Tensor], out: Tensor, out_lse: Tensor, backend: Optional[str] = None
) -> None:
    _merge.run("merge_attn_states_n", outs, lses, out, out_lse, backend)


@register_fake("cpattn::merge_attn_states_n_out")
def _(outs, lses, out, out_lse, backend=None):
    _merge.validate("merge_attn_states_n", outs, lses, out, out_lse)


# ---------------------------------------------------------------- dcp_decode_attention (DCP)
# A ProcessGroup cannot be an op argument: the group travels by name ("" = default group).

from . import dcp as _dcp  # noqa: E402


@custom_op("cpattn::dcp_decode_attention", mutates_args=())
def dcp_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Optional[Tensor], block_table: Tensor, seq_lens: Tensor,
    query_start_loc: Optional[Tensor], group_name: str, interleave: int, scale: Optional[float],
    v_head_dim: Optional[int], heads: str, combine: str, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    return _dcp.run(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, group_name, interleave, scale,
                    v_head_dim, heads, combine, backend)


@register_fake("cpattn::dcp_decode_attention")
def _(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, group_name, interleave, scale, v_head_dim,
      heads, combine, backend=None):
    dv = _dcp.check_shapes(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, v_head_dim, heads, combine)
    return q.new_empty(q.shape[0], q.shape[1], dv), q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)


# ---------------------------------------------------------------- pcp_ring_prefill (PCP)
# A ProcessGroup cannot be an op argument: the op takes the group's name ("" = default group);
# the optional cached context (cpattn.PcpContext) travels as its tensors and interleave.


@custom_op("cpattn::pcp_ring_prefill", mutates_args=())
def pcp_ring_prefill(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, group_name: str = "", causal: bool = True,
    scale: Optional[float] = None, method: str = "ring", backend: Optional[str] = None,
    k_cache: Optional[Tensor] = None, v_cache: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
    context_lens: Optional[Tensor] = None, interleave: int = 1,
) -> tuple[Tensor, Tensor]:
    from . import pcp as _pcp

    return _pcp.run(q, k, v, cu_seqlens, group_name, causal, scale, method, backend,
                    k_cache, v_cache, block_table, context_lens, interleave)


@register_fake("cpattn::pcp_ring_prefill")
def _(q, k, v, cu_seqlens, group_name="", causal=True, scale=None, method="ring", backend=None,
      k_cache=None, v_cache=None, block_table=None, context_lens=None, interleave=1):
    from . import pcp as _pcp

    return _pcp.empty_outputs(q, v)


# ---------------------------------------------------------------- plan/run serving API
# A plan's run() is one opaque op: its metadata buffers and host-known bounds live in the plan
# (found by its key), so torch.compile sees no Python state that changes with plan() and a new
# plan() with the same padded sizes needs no recompilation.


@custom_op("cpattn::dcp_plan_run", mutates_args=())
def dcp_plan_run(q: Tensor, k_cache: Tensor, v_cache: Optional[Tensor], plan_key: str) -> tuple[Tensor, Tensor]:
    from . import dcp_plan

    return dcp_plan.lookup(plan_key)._execute(q, k_cache, v_cache)


@register_fake("cpattn::dcp_plan_run")
def _(q, k_cache, v_cache, plan_key):
    from . import dcp_plan

    return dcp_plan.lookup(plan_key).empty_outputs(q)


@custom_op("cpattn::pcp_plan_run", mutates_args=())
def pcp_plan_run(q: Tensor, k: Tensor, v: Tensor, plan_key: str) -> tuple[Tensor, Tensor]:
    from . import pcp_plan

    return pcp_plan.lookup(plan_key)._execute(q, k, v)


@register_fake("cpattn::pcp_plan_run")
def _(q, k, v, plan_key):
    from . import pcp as _pcp

    return _pcp.empty_outputs(q, v)
