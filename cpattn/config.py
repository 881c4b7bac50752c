"""Validate a context-parallel deployment before anything is allocated.

The rules (vLLM / vllm-ascend's context parallel guide, and why they hold):

* Sizes ``tp``, ``pcp``, ``dcp``, ``interleave``, ``block_size`` are positive ints; the
  deployment has ``tp * pcp`` devices.
* ``block_size % interleave == 0``: a run of ``interleave`` tokens must not straddle two KV
  blocks. When KV blocks are transferred between nodes (PD disaggregation, KV pooling) blocks
  must move whole, so ``interleave == block_size``.
* DCP ranks are a subset of a TP group: they hold different query heads but must hold the same
  KV heads (each computes all gathered heads against its own shard of the same KV).

  - MLA (one latent KV head, replicated on every TP rank): ``tp >= dcp`` and ``tp % dcp == 0``.
  - GQA: ``tp // num_kv_heads`` ranks replicate each KV head, and the DCP group must sit inside
    one such set: ``tp // num_kv_heads >= dcp`` and ``(tp // num_kv_heads) % dcp == 0``. (With
    ``dcp == 1`` there is nothing to check.) Heads must also split over TP as usual:
    ``num_q_heads % tp == 0``, ``num_q_heads % num_kv_heads == 0``, and ``tp`` a multiple or a
    divisor of ``num_kv_heads``.

:func:`validate_cp_config` raises ValueError/TypeError whose message says what to change, and
returns a :class:`CPConfig` with the derived sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CPConfig", "validate_cp_config"]


@dataclass(frozen=True)
class CPConfig:
    """A validated deployment. ``world_size = tp * pcp``; ``kv_head_replicas``: TP ranks holding
    each KV head (``tp`` for MLA); ``q_heads_per_rank``: query heads on a TP rank (None if
    ``num_q_heads`` was not given)."""

    tp: int
    pcp: int
    dcp: int
    interleave: int
    block_size: int
    attention: str
    num_q_heads: int | None
    num_kv_heads: int | None
    kv_transfer: bool
    world_size: int
    kv_head_replicas: int
    q_heads_per_rank: int | None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _int(name: str, x, *, optional: bool = False) -> int | None:
    if x is None and optional:
        return None
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"cp config: {name} must be a positive int; got {x!r}")
    if x <= 0:
        raise ValueError(f"cp config: {name} must be a positive int; got {x}")
    return x


def validate_cp_config(
    *,
    tp: int,
    pcp: int = 1,
    dcp: int = 1,
    interleave: int = 1,
    block_size: int = 128,
    attention: str = "gqa",
    num_q_heads: int | None = None,
    num_kv_heads: int | None = None,
    kv_transfer: bool = False,
) -> CPConfig:
    """Check a deployment; return it with derived sizes or raise with what to change.

    ``attention``: ``"mla"`` (``num_kv_heads`` ignored: one latent head) or ``"gqa"`` (MHA and
    MQA included; ``num_q_heads`` and ``num_kv_heads`` required). ``kv_transfer``: KV blocks move
    between nodes (PD disaggregation, KV pooling).
    """
    tp, pcp, dcp = _int("tp", tp), _int("pcp", pcp), _int("dcp", dcp)
    interleave, block_size = _int("interleave", interleave), _int("block_size", block_size)
    if attention not in ("mla", "gqa"):
        raise ValueError(f"cp config: attention must be 'mla' or 'gqa'; got {attention!r}")
    num_q_heads = _int("num_q_heads", num_q_heads, optional=True)
    if block_size % interleave:
        raise ValueError(
            f"cp config: block_size ({block_size}) must be a multiple of interleave ({interleave}); "
            f"set interleave to a divisor of the block size (e.g. 1 or {block_size}) or change "
            f"block_size to a multiple of {interleave}"
        )
    if kv_transfer and interleave != block_size:
        raise ValueError(
            f"cp config: with KV transfer between nodes blocks must move whole, so interleave must "
            f"equal block_size; got interleave={interleave}, block_size={block_size}: set "
            f"interleave={block_size} (cp_kv_cache_interleave_size)"
        )
    if num_q_heads is not None and num_q_heads % tp:
        raise ValueError(
            f"cp config: num_q_heads ({num_q_heads}) must be divisible by tp ({tp}); use tp in "
            f"{[d for d in _divisors(num_q_heads)]}"
        )
    if attention == "mla":
        replicas = tp
        if dcp > tp or tp % dcp:
            raise ValueError(
                f"cp config: MLA needs tp >= dcp and tp % dcp == 0 (DCP ranks are a subset of the TP "
                f"group); got tp={tp}, dcp={dcp}: use dcp in {_divisors(tp)} or tp a multiple of {dcp}"
            )
        num_kv_heads = None
    else:
        if num_q_heads is None or num_kv_heads is None:
            raise ValueError("cp config: GQA needs num_q_heads and num_kv_heads (use attention='mla' for MLA)")
        num_kv_heads = _int("num_kv_heads", num_kv_heads)
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"cp config: num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if tp % num_kv_heads and num_kv_heads % tp:
            raise ValueError(
                f"cp config: tp ({tp}) must be a multiple or a divisor of num_kv_heads ({num_kv_heads}) so "
                f"KV heads split evenly over TP ranks"
            )
        replicas = max(1, tp // num_kv_heads)
        if dcp > 1 and (tp // num_kv_heads < dcp or (tp // num_kv_heads) % dcp):
            r = tp // num_kv_heads
            allowed = _divisors(r) if r else [1]
            raise ValueError(
                f"cp config: GQA needs (tp // num_kv_heads) >= dcp and divisible by dcp: DCP ranks must all "
                f"hold the same KV heads, and tp={tp} over num_kv_heads={num_kv_heads} gives {r} rank(s) per "
                f"KV head; use dcp in {allowed} or raise tp to a multiple of num_kv_heads * dcp = "
                f"{num_kv_heads * dcp}"
            )
    return CPConfig(
        tp=tp, pcp=pcp, dcp=dcp, interleave=interleave, block_size=block_size, attention=attention,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, kv_transfer=bool(kv_transfer),
        world_size=tp * pcp, kv_head_replicas=replicas,
        q_heads_per_rank=None if num_q_heads is None else num_q_heads // tp,
    )
