"""The seam between the model integration and cpattn's attention ops.

The integration calls attention once per layer; what runs there is decided here, so that the
model code does not care whether it is a one-call op or a plan/run pair:

* :class:`PrefillAttention`: ``plan(cu_seqlens)`` once per prefill, ``run(q, k, v, scale)`` per
  layer -> :func:`cpattn.pcp_ring_prefill` (this rank's rows, ``pcp_partition`` order).
* :class:`DecodeAttention`: ``plan(seq_lens, block_table)`` once per decode step,
  ``run(q, k_cache, v_cache, scale)`` per layer -> :func:`cpattn.dcp_decode_attention`
  (``heads="replicated"``: every rank holds all heads, results bitwise equal on every rank).
"""
from __future__ import annotations

import torch

import cpattn


class PrefillAttention:
    def __init__(self, group, *, method: str, backend: str | None):
        self.group, self.method, self.backend = group, method, backend
        self.cu = None

    def plan(self, cu_seqlens: torch.Tensor) -> None:
        self.cu = cu_seqlens

    def run(self, q, k, v, scale: float) -> torch.Tensor:
        return cpattn.pcp_ring_prefill(q, k, v, self.cu, group=self.group, scale=scale, method=self.method,
                                       backend=self.backend)


class DecodeAttention:
    def __init__(self, group, *, interleave: int, backend: str | None):
        self.group, self.interleave, self.backend = group, interleave, backend
        self.seq_lens = self.block_table = None

    def plan(self, seq_lens: torch.Tensor, block_table: torch.Tensor) -> None:
        self.seq_lens, self.block_table = seq_lens, block_table

    def run(self, q, k_cache, v_cache, scale: float, v_head_dim: int | None = None) -> torch.Tensor:
        return cpattn.dcp_decode_attention(q, k_cache, v_cache, self.block_table, self.seq_lens, group=self.group,
                                           interleave=self.interleave, scale=scale, v_head_dim=v_head_dim,
                                           backend=self.backend)
