"""The partial-result contract and adapters for the LSE forms other libraries produce.

A *partial result* over a key set K is a pair ``(out, lse)``::

    s_k = scale * (q . k)
    lse = log(sum_{k in K} exp(s_k))            # natural log
    out = sum_{k in K} exp(s_k - lse) * v_k

Canonical form, everywhere in cpattn's public API:

* ``lse`` is **float32**, **natural log**, and has the shape of ``out`` without its last
  dimension (token-major: ``out [T, H, D]`` goes with ``lse [T, H]``).
* The empty key set is the state ``(out = 0, lse = -inf)``. It is the identity of merging, and
  merging two empty states gives ``(0, -inf)`` (never NaN).
* An input ``lse`` of ``+inf`` or NaN means "empty" too (FlashAttention-2 and Ascend's fused
  attention write ``+inf`` for rows that saw no key). The ``out`` rows under such an LSE are
  ignored, whatever they hold (NaN included).

Foreign forms must be converted explicitly with the functions below before they meet a merge:
base-2 LSEs (FlashInfer), head-major ``[H, T]`` LSEs (FlashAttention varlen), and running
``(max, sum)`` pairs (Ascend's ring update).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "LN2",
    "empty_state",
    "sanitize",
    "is_empty",
    "from_base2",
    "to_base2",
    "head_major_to_token_major",
    "token_major_to_head_major",
    "from_max_sum",
]

LN2 = math.log(2.0)


def empty_state(
    shape: tuple[int, ...] | torch.Size,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty partial result: ``out = zeros(*shape, head_dim)``, ``lse = full(shape, -inf)``.

    ``lse`` is float32 whatever ``dtype`` is (``dtype`` applies to ``out`` only).
    """
    out = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
    lse = torch.full(tuple(shape), float("-inf"), dtype=torch.float32, device=device)
    return out, lse


def sanitize(lse: torch.Tensor) -> torch.Tensor:
    """Map ``+inf`` and NaN to ``-inf`` (the empty state); keep finite values and ``-inf``.

    Returns a new tensor of the same dtype and shape; never a host sync.
    """
    bad = torch.isnan(lse) | torch.isposinf(lse)
    return lse.masked_fill(bad, float("-inf"))


def is_empty(lse: torch.Tensor) -> torch.Tensor:
    """Boolean mask of rows that hold no key under the contract (``-inf``, ``+inf`` or NaN)."""
    return ~torch.isfinite(lse)


def from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """Convert a base-2 LSE (``log2 sum 2^(s*log2 e)``, FlashInfer) to natural log, float32.

    Infinities and NaN keep their meaning (``-inf`` stays empty; ``+inf``/NaN still mean empty).
    """
    return lse2.float() * LN2


def to_base2(lse: torch.Tensor) -> torch.Tensor:
    """Convert a natural-log LSE to base 2 (for handing results to a base-2 consumer), float32."""
    return lse.float() / LN2


def head_major_to_token_major(lse: torch.Tensor) -> torch.Tensor:
    """``[..., H, T]`` (FlashAttention varlen, ``[H, T]``) to the canonical ``[..., T, H]``.

    Returns a contiguous float32 tensor.
    """
    if lse.dim() < 2:
        raise ValueError(f"lse must have at least 2 dims ([H, T]); got shape {tuple(lse.shape)}")
    return lse.transpose(-1, -2).float().contiguous()


def token_major_to_head_major(lse: torch.Tensor) -> torch.Tensor:
    """Canonical ``[..., T, H]`` to head-major ``[..., H, T]``; contiguous float32."""
    if lse.dim() < 2:
        raise ValueError(f"lse must have at least 2 dims ([T, H]); got shape {tuple(lse.shape)}")
    return lse.transpose(-1, -2).float().contiguous()


def from_max_sum(
    row_max: torch.Tensor, row_sum: torch.Tensor, *, base2: bool = False
) -> torch.Tensor:
    """Build an LSE from running ``(max, sum)`` softmax statistics.

    ``row_sum = sum_k exp(s_k - row_max)`` (or ``2^(s_k - row_max)`` with ``base2=True``, when
    ``row_max`` is in base-2 units too). Returns the natural-log LSE ``row_max + log(row_sum)``
    as float32; a row with ``row_sum == 0`` (no key) or a non-finite max is empty (``-inf``).
    """
    if row_max.shape != row_sum.shape:
        raise ValueError(
            f"row_max and row_sum must have the same shape; got {tuple(row_max.shape)} "
            f"and {tuple(row_sum.shape)}"
        )
    m = row_max.float()
    s = row_sum.float()
    if base2:
        lse = (m + torch.log2(s)) * LN2
    else:
        lse = m + torch.log(s)
    empty = (s <= 0) | ~torch.isfinite(m) | ~torch.isfinite(s)
    return lse.masked_fill(empty, float("-inf"))
