"""The reference backend: :mod:`cpattn.reference` (float64 math) behind the kernel interface.

Results are rounded to the output dtype (float32 for LSEs). Slow, exact, runs on any device.
"""
from __future__ import annotations

import torch

from .. import reference
from .registry import Backend

BACKEND = Backend("reference", "float64 oracle in plain PyTorch (slow; any device)")


@BACKEND.kernel("merge")
def merge(outs, lses, out, out_lse, nan_propagate=False):
    o, l = reference.merge_n(outs, lses, nan_propagate=nan_propagate)
    out.copy_(o)
    out_lse.copy_(l)


@BACKEND.kernel("paged_attention")
def paged_attention(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
                    max_query_len, max_kv_len):
    """Gather each request's visible local keys from the paged cache and run
    :func:`cpattn.reference.attention` with positions (local key ``j`` is visible to a query
    with ``visible_lens[t] = n`` iff ``j < n``). Reads the metadata on the host."""
    bs = k_cache.shape[1]
    qsl = [int(x) for x in query_start_loc.tolist()]
    if len(qsl) < 2 or qsl[-1] == 0:
        out = torch.zeros(*q.shape[:2], v_head_dim, dtype=q.dtype, device=q.device)
        lse_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
        return out, torch.full(q.shape[:2], float("-inf"), dtype=lse_dtype, device=q.device)
    vis = visible_lens.to(torch.int64).cpu()
    k_flat = k_cache.reshape(-1, *k_cache.shape[2:])
    ks, vs, cu_k = [], [], [0]
    for b in range(len(qsl) - 1):
        n = int(vis[qsl[b]:qsl[b + 1]].max()) if qsl[b + 1] > qsl[b] else 0
        j = torch.arange(n)
        slots = (block_table[b].to(torch.int64).cpu()[j // bs] * bs + j % bs).to(k_cache.device)
        kb = k_flat[slots]
        ks.append(kb)
        vs.append(kb[..., :v_head_dim] if v_cache is None else v_cache.reshape(-1, *v_cache.shape[2:])[slots])
        cu_k.append(cu_k[-1] + n)
    k_pos = torch.cat([torch.arange(cu_k[b + 1] - cu_k[b]) for b in range(len(cu_k) - 1)] or [torch.zeros(0, dtype=torch.int64)])
    o, l = reference.attention(
        q, torch.cat(ks), torch.cat(vs),
        cu_seqlens_q=torch.tensor(qsl), cu_seqlens_k=torch.tensor(cu_k), causal=True, scale=scale,
        q_positions=vis - 1, k_positions=k_pos,
    )
    return o.to(q.dtype), l if q.dtype == torch.float32 else l.float()  # float64 LSE for float32 q


@BACKEND.kernel("attention")
def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False, scale=None):
    """:func:`cpattn.reference.attention` in float64, rounded to ``q.dtype`` (LSE float32)."""
    o, l = reference.attention(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal,
                               scale=scale, q_positions=q_positions, k_positions=k_positions)
    return o.to(q.dtype), l.float()
