"""The seam between the model integration and cpattn's attention ops: plan once per step, run
once per layer (:class:`cpattn.PcpPrefillPlan`, :class:`cpattn.DcpDecodePlan`).

* :class:`PrefillAttention`: one :class:`cpattn.PcpPrefillPlan` per ContextParallelLM (built
  collectively in its constructor); ``plan(cu_seqlens)`` once per prefill (partition, positions,
  ring schedule and the every-rank agreement, on the host), ``run(q, k, v, scale)`` per layer.
* :class:`DecodeAttention`: one :class:`cpattn.DcpDecodePlan` per ``generate`` (its buffers are
  sized by the batch and the block table); ``plan(seq_lens, block_table)`` once per decode step,
  ``run(q, k_cache, v_cache, scale)`` per layer (``heads="replicated"``: every rank holds all
  heads and gets bitwise the same result).

``run`` checks that the model's ``scaling`` equals the planned scale: a model whose layers used
different scales would otherwise be computed with the wrong one.
"""
from __future__ import annotations

import torch

import cpattn


def _same_scale(planned: float, got, where: str) -> None:
    if got is not None and float(got) != planned:
        raise RuntimeError(f"cpattn {where}: the model passed scaling={got!r} but the plan was built with scale="
                           f"{planned!r} (layers with different softmax scales are not supported)")


class PrefillAttention:
    def __init__(self, group, *, method: str, scale: float, backend: str | None, device):
        self.scale = float(scale)
        self.plan_ = cpattn.PcpPrefillPlan(group, method=method, causal=True, scale=self.scale, backend=backend,
                                           device=device)

    def plan(self, cu_seqlens: torch.Tensor) -> None:
        self.plan_.plan(cu_seqlens)

    def run(self, q, k, v, scale) -> torch.Tensor:
        _same_scale(self.scale, scale, "prefill")
        return self.plan_.run(q, k, v)


class DecodeAttention:
    """``mla``: ``k_cache`` holds latent rows ``[r + rope]`` (one KV head) and V is their first
    ``v_head_dim = r`` channels; ``head_dim`` is the cache row width."""

    def __init__(self, group, *, num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int, mla: bool,
                 block_size: int, interleave: int, scale: float, max_num_seqs: int, max_blocks_per_seq: int,
                 dtype, device, backend: str | None):
        self.scale = float(scale)
        self.plan_ = cpattn.DcpDecodePlan(
            group, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
            v_head_dim=v_head_dim, mla=mla, interleave=interleave, heads="replicated", scale=self.scale,
            max_num_seqs=max_num_seqs, max_blocks_per_seq=max_blocks_per_seq, dtype=dtype, device=device,
            backend=backend)

    def plan(self, seq_lens: torch.Tensor, block_table: torch.Tensor) -> None:
        self.plan_.plan(seq_lens, block_table)

    def run(self, q, k_cache, v_cache, scale) -> torch.Tensor:
        _same_scale(self.scale, scale, "decode")
        return self.plan_.run(q, k_cache, v_cache)
