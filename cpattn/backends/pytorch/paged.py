"""Local paged attention in plain PyTorch (any device): the per-rank half of DCP decode.

Each query token sees a prefix of its request's local key sequence (``visible_lens[t]`` keys),
stored in a paged cache through a block table. The keys are walked in chunks of whole blocks,
sized so that every temporary (gathered K/V in float32, the score block) stays within about
``_CHUNK_ELEMS`` elements whatever the context length; partial results of the chunks are
combined with an online softmax in float32. No score matrix over the whole context exists, so
32k-token (or 1M-token) contexts take the same working memory as short ones.

GQA without repeating KV: queries are reshaped to ``[B, Hkv, Qmax * G, D]`` (``G = Hq / Hkv``
query heads per KV head, ``Qmax`` query tokens per request padded) and multiplied with the
``[B, Hkv, C, D]`` key chunk directly. MLA is the ``Hkv = 1`` case with V read as the first
``v_head_dim`` channels of the gathered K chunk (no second gather).

Robustness: block-table entries past a request's local length are never dereferenced (they are
replaced by block 0 and masked), and gathered K/V rows past the length are zeroed, so stale or
NaN cache contents and padded/garbage block-table entries cannot leak into the result. A query
with no visible key gets ``out = 0``, ``lse = -inf``.

No host sync: the caller passes ``max_query_len`` and ``max_kv_len`` (host ints it already has).
"""
from __future__ import annotations

import torch

_CHUNK_ELEMS = 1 << 22  # elements per temporary (16 MiB in float32)


def check(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
          max_query_len, max_kv_len) -> list[str]:
    reasons = []
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"paged_attention supports float32/bfloat16/float16 queries, not {q.dtype}")
    return reasons


def paged_attention(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
                    max_query_len, max_kv_len):
    """``q [T, Hq, Dqk]``; ``k_cache [NB, bs, Hkv, Dqk]``; ``v_cache [NB, bs, Hkv, Dv]`` or None
    (V = ``k[..., :v_head_dim]``); ``block_table [B, MB]``; ``query_start_loc [B+1]``;
    ``visible_lens [T]`` (local keys each query sees); ``max_query_len >= max n_b``;
    ``max_kv_len >= max visible_lens``. Returns ``out [T, Hq, Dv]`` (q dtype), ``lse [T, Hq]``
    float32."""
    T, Hq, Dqk = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    Dv = v_head_dim
    B = block_table.shape[0]
    G = Hq // Hkv
    Qm = max(int(max_query_len), 1)
    dev = q.device
    out = torch.zeros(T, Hq, Dv, dtype=q.dtype, device=dev)
    lse = torch.full((T, Hq), float("-inf"), dtype=torch.float32, device=dev)
    if T == 0 or B == 0 or max_kv_len <= 0:
        return out, lse

    # Pad queries per request: token t -> (request b, slot j).
    qsl = query_start_loc.to(torch.int64)
    req = torch.repeat_interleave(torch.arange(B, device=dev), qsl[1:] - qsl[:-1], output_size=T)
    slot = torch.arange(T, device=dev) - qsl[:-1][req]
    qp = torch.zeros(B, Qm, Hq, Dqk, dtype=torch.float32, device=dev)
    qp[req, slot] = q.float() * scale
    qp = qp.view(B, Qm, Hkv, G, Dqk).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Qm * G, Dqk)
    vis = torch.zeros(B, Qm, dtype=torch.int64, device=dev)
    vis[req, slot] = visible_lens.to(torch.int64)
    kv_len = vis.amax(dim=1)  # [B]: local keys any query of the request sees

    # Chunk of whole blocks, bounded by the largest temporary.
    per_pos = B * max(Hkv * max(Dqk, Dv), Hq * Qm)
    nblk = max(1, min(_CHUNK_ELEMS // max(per_pos * bs, 1), -(-max_kv_len // bs)))
    C = nblk * bs
    m = torch.full((B, Hkv, Qm * G), float("-inf"), dtype=torch.float32, device=dev)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, Hkv, Qm * G, Dv, dtype=torch.float32, device=dev)
    table = block_table.to(torch.int64)
    mla = v_cache is None
    for c0 in range(0, max_kv_len, C):
        b0 = c0 // bs
        b1 = min(b0 + nblk, -(-max_kv_len // bs), table.shape[1])
        cols = torch.arange(b0, b1, device=dev)
        pos = torch.arange(b0 * bs, b1 * bs, device=dev)  # [C]
        live_blk = (cols * bs)[None, :] < kv_len[:, None]  # [B, nb]
        ids = torch.where(live_blk, table[:, b0:b1], torch.zeros_like(table[:, b0:b1]))
        dead = (pos[None, :] >= kv_len[:, None])[:, :, None, None]  # [B, C, 1, 1]
        k = k_cache[ids].reshape(B, -1, Hkv, Dqk).masked_fill_(dead, 0)  # [B, C, Hkv, Dqk]
        kf = k.permute(0, 2, 1, 3).float()  # [B, Hkv, C, Dqk]
        if mla:
            vf = kf[..., :Dv]
        else:
            v = v_cache[ids].reshape(B, -1, Hkv, Dv).masked_fill_(dead, 0)
            vf = v.permute(0, 2, 1, 3).float()
        s = torch.matmul(qp, kf.transpose(-1, -2))  # [B, Hkv, Qm*G, C]
        hidden = pos.view(1, 1, -1) >= vis[:, :, None]  # [B, Qm, C]
        s.view(B, Hkv, Qm, G, -1).masked_fill_(hidden[:, None, :, None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
        p = torch.exp(s.sub_(m_safe[..., None]))
        alpha = torch.exp(m - m_safe)
        l.mul_(alpha).add_(p.sum(dim=-1))
        acc.mul_(alpha[..., None]).add_(torch.matmul(p, vf))
        m = m_new

    seen = l > 0
    o = acc / l.masked_fill(~seen, 1.0)[..., None]
    row_lse = torch.where(seen, m + torch.log(l.masked_fill(~seen, 1.0)), torch.full_like(m, float("-inf")))
    o = o.view(B, Hkv, Qm, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, Qm, Hq, Dv)
    row_lse = row_lse.view(B, Hkv, Qm, G).permute(0, 2, 1, 3).reshape(B, Qm, Hq)
    out.copy_(o[req, slot])
    lse.copy_(row_lse[req, slot])
    return out, lse
