"""Online-softmax pieces shared by the Triton attention kernels (float32 throughout)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_step(m_i, l_i, acc, s, v_tile):
    """Fold one tile of masked scores ``s [M, N]`` (``-inf`` where hidden) and its values
    ``v_tile [N, DV]`` (float32) into the running ``(max, sum, acc)`` of each row."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v_tile, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def finish(m_i, l_i, acc, sees):
    """``(out, lse)`` of each row; a row that saw no key (``sees`` false) gives ``(0, -inf)``.

    A NaN weight sum means a visible score was NaN or ``+inf`` (a NaN query, a NaN/inf key), and
    a zero weight sum on a row that sees keys means every visible score was ``-inf`` (an inf in
    the query or a key, of the opposite sign): either way that row becomes NaN (output and LSE),
    as ``cpattn.reference`` poisons it, instead of being mistaken for a row with no key."""
    bad = (l_i != l_i) | (sees & (l_i == 0))
    seen = l_i > 0
    denom = tl.where(seen, l_i, 1.0)
    out = tl.where(bad[:, None], float("nan"), acc / denom[:, None])
    lse = tl.where(seen, m_i + tl.log(denom), float("-inf"))
    return out, tl.where(bad, float("nan"), lse)
