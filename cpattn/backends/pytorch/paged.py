"""Local paged attention in plain PyTorch (any device): the per-rank half of DCP decode.

Each query token sees a prefix of its request's local key sequence (``visible_lens[t]`` keys),
stored in a paged cache through a block table. The keys are walked in chunks of whole blocks,
sized so that every temporary (gathered K/V converted to the compute dtype, the score block)
stays within about ``_CHUNK_ELEMS`` elements whatever the context length; partial results of
the chunks are combined with an online softmax. No score matrix over the whole context exists,
so 32k-token (or 1M-token) contexts take the same working memory as short ones.

Compute dtype: float32 for bfloat16/float16 inputs; float64 for float32 inputs. A float32
online softmax followed by a cross-rank merge costs a few ulps more than plain float32
attention in one pass (measured up to 1.7x the 2x-plain-PyTorch tolerance over random cases),
so float32 callers would get a less accurate answer than PyTorch gives them; in float64 the
result stays within 0.75x of that tolerance after the merge. For the same reason the LSE of a
float32 query is returned in float64 (a float32 LSE of magnitude ~6 is only known to ~2.4e-7,
a merge-weight error that alone broke the tolerance in 1 of 1000 thorough cases).

GQA without repeating KV: queries are reshaped to ``[Hkv, B, Qmax * G, D]`` (``G = Hq / Hkv``
query heads per KV head, ``Qmax`` query tokens per request padded) and each KV head's rows are
multiplied (one ``bmm`` over the batch) with a strided view of the gathered ``[B, C, Hkv, D]``
key chunk: no repeat, no transposed copy. MLA is the ``Hkv = 1`` case with V read as the first
``v_head_dim`` channels of the gathered K chunk (no second gather).

Robustness: block-table entries past a request's local length are never dereferenced (they are
replaced by block 0 and masked), and gathered K/V rows past the length are zeroed, so stale or
NaN cache contents and padded/garbage block-table entries cannot leak into the result. A query
with no visible key gets ``out = 0``, ``lse = -inf``.

NaN and inf are never hidden (:mod:`cpattn.reference`'s rule): a query row that sees a key and
whose query, or the key or value of a key it sees, holds a NaN or inf comes out NaN (``out`` and
``lse``), so that DCP's strict merge carries it into the result. On CPU the check is nearly free:
a NaN/inf in a chunk's K makes its raw scores non-finite (query rows are cleaned first; padding
rows are zeros and 0 * inf is NaN), one in V makes ``p @ V`` non-finite, and both are small next
to the chunk. Only then is the chunk cleaned (its non-finite values zeroed, so that a masked
key's weight 0 times NaN cannot reach a query that does not see it) and run again, and the first
such position per request and KV head is kept: every query whose visible prefix reaches it is
poisoned. Without host reads (off CPU, and inside a plan's ``run``) no chunk can be checked
first, and no extra pass over K is made either: the score bmm carries one extra query row per
KV head and request, ``_PROBE`` in every channel, whose score ``sum(_PROBE * k)`` is non-finite
exactly when the key is (too small a factor for any finite key to overflow it; not zero, so no
BLAS can skip it). With several queries per request (a key can then be hidden from an earlier
query of its request) V's rows are searched too (:mod:`.finite`) and V is cleaned. With one query
per request (how DCP always runs this kernel) no key of a chunk is hidden from a query that could
meet it (rows past a request's length are zeroed in the gather), so nothing is cleaned: a
non-finite V shows in ``p @ V``, caught at the end. On the CPU of docs/performance.md this path
costs 0-10% more CPU time than the host-read one (8 x 4096 tokens, bfloat16; up to ~15% for
float32, whose float64 score bmm pays for the probe row), where a reduction pass over K cost 10-18%
and ``isfinite`` over K 3-4x.

No host sync off CPU: the caller passes ``max_query_len`` and ``max_kv_len`` (host ints it
already has); on CPU, where it is free, ``min(visible_lens)`` is read too so that chunks every
query fully sees skip the masking.
"""
from __future__ import annotations

import torch

from ..hostsync import host_reads_allowed
from .finite import all_finite, bad_rows, poison_

#: Host reads where they are free (CPU). False runs the path used on other devices and inside a
#: plan's ``run`` (no host sync: every chunk masked, K searched by the probe row); tests set it
#: to check that path on CPU.
HOST_CHECKS = True
#: The probe row's value: small enough that no finite key (float32 range, head dims < 2**16)
#: can overflow its score, large enough to stay a normal number in float32.
_PROBE = 2.0 ** -64
_CHUNK_ELEMS = 1 << 21  # elements per temporary (8 MiB in float32); measured best of 2^18..2^23 on CPU


def check(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
          max_query_len, max_kv_len) -> list[str]:
    reasons = []
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"paged_attention supports float32/bfloat16/float16 queries, not {q.dtype}")
    return reasons


def paged_attention(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim,
                    max_query_len, max_kv_len, min_visible=None, out=None, workspace=None):
    """``q [T, Hq, Dqk]``; ``k_cache [NB, bs, Hkv, Dqk]``; ``v_cache [NB, bs, Hkv, Dv]`` or None
    (V = ``k[..., :v_head_dim]``); ``block_table [B, MB]``; ``query_start_loc [B+1]``;
    ``visible_lens [T]`` (local keys each query sees); ``max_query_len >= max n_b``;
    ``max_kv_len >= max visible_lens``; ``min_visible`` (optional, a plan's host-known
    ``<= min visible_lens``) spares the CPU its read of ``min(visible_lens)``; ``out`` (optional
    ``[T, Hq, Dv]`` q-dtype buffer) receives the output; ``workspace`` (optional dict kept by the
    caller, filled at its maximum sizes by :func:`reserve`) holds the chunk buffers between calls.
    Returns ``out [T, Hq, Dv]`` (q dtype), ``lse [T, Hq]`` float32 (float64 for float32 ``q``)."""
    T, Hq, Dqk = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    Dv = v_head_dim
    B = block_table.shape[0]
    G = Hq // Hkv
    Qm = max(int(max_query_len), 1)
    dev = q.device
    cd = _compute_dtype(q.dtype)
    out = torch.zeros(T, Hq, Dv, dtype=q.dtype, device=dev) if out is None else out.zero_()
    lse = torch.full((T, Hq), float("-inf"), dtype=_lse_dtype(q.dtype), device=dev)
    if T == 0 or B == 0 or NB == 0 or max_kv_len <= 0:
        return out, lse
    qs = q.to(cd) * scale
    q_bad = bad_rows(qs)  # [T, Hq]: poisoned queries (if they see any key), overflow included

    # Pad queries per request: token t -> (request b, slot j). Query rows are laid out
    # [Hkv, B, Qm * G, D] so that each KV head's scores are one contiguous bmm output.
    qsl = query_start_loc.to(torch.int64)
    req = torch.repeat_interleave(torch.arange(B, device=dev), qsl[1:] - qsl[:-1], output_size=T)
    slot = torch.arange(T, device=dev) - qsl[:-1][req]
    qp = torch.zeros(B, Qm, Hq, Dqk, dtype=cd, device=dev)
    qp[req, slot] = qs.nan_to_num_(0.0, 0.0, 0.0)  # a non-finite query row: NaN at the end
    qp = qp.view(B, Qm, Hkv, G, Dqk).permute(2, 0, 1, 3, 4).reshape(Hkv, B, Qm * G, Dqk)
    vis = torch.zeros(B, Qm, dtype=torch.int64, device=dev)
    vis[req, slot] = visible_lens.to(torch.int64)
    kv_len = vis.amax(dim=1)  # [B]: local keys any query of the request sees
    # Below min(visible) nothing is masked. Known for free on CPU; elsewhere mask every chunk
    # rather than sync with the host.
    on_cpu = dev.type == "cpu" and HOST_CHECKS and host_reads_allowed()
    QG = Qm * G
    # Without host reads, K is searched for NaN/inf by the score bmm itself: one extra query row
    # per KV head and request holding _PROBE in every channel scores sum(_PROBE * k) per key,
    # non-finite exactly when the key is (no finite key can overflow it), at no extra pass over K.
    QGx = QG if on_cpu else QG + 1
    if not on_cpu:
        qp = torch.cat([qp, torch.full((Hkv, B, 1, Dqk), _PROBE, dtype=cd, device=dev)], dim=2)
    if min_visible is not None:
        no_mask_below = int(min_visible)
    else:
        no_mask_below = int(visible_lens.min()) if on_cpu else 0

    nblk = _chunk_blocks(B, Hq, Hkv, Dqk, Dv, Qm, bs, max_kv_len)
    m = torch.full((Hkv, B, QG), float("-inf"), dtype=cd, device=dev)
    l = torch.zeros_like(m)
    acc = torch.zeros(Hkv, B, QG, Dv, dtype=cd, device=dev)
    pv = torch.empty_like(acc)  # one chunk's p @ V, checked before it joins acc
    table = block_table.to(torch.int64)
    n_cols = min(-(-max_kv_len // bs), table.shape[1])
    # Buffers reused by every chunk (fresh large allocations cost page faults on each chunk).
    buf = _Buffers.take(workspace, B * nblk * bs, Hkv, Dqk, Dv, QGx, q.dtype, cd, dev, with_v=v_cache is not None)
    # first local position whose key or value holds a NaN/inf, per request and KV head
    no_bad = n_cols * bs
    first_bad = torch.full((B, Hkv), no_bad, dtype=torch.int64, device=dev)
    for b0 in range(0, n_cols, nblk):
        b1 = min(b0 + nblk, n_cols)
        c = (b1 - b0) * bs
        pos = torch.arange(b0 * bs, b1 * bs, device=dev)  # [c]
        live_blk = (torch.arange(b0, b1, device=dev) * bs)[None, :] < kv_len[:, None]  # [B, nb]
        ids = torch.where(live_blk, table[:, b0:b1], torch.zeros_like(table[:, b0:b1])).view(-1)
        masked = b1 * bs > no_mask_below
        dead = (pos[None, :] >= kv_len[:, None])[:, :, None, None] if masked else None  # [B, c, 1, 1]
        kf = buf.gather(k_cache, ids, "k", B, c, dead)  # [B, c, Hkv, Dqk] compute dtype
        vf = kf[..., :Dv] if v_cache is None else buf.gather(v_cache, ids, "v", B, c, dead)
        v_sep = vf if v_cache is not None else None  # for MLA, V is a view of K
        s = buf.scores[: Hkv * B * QGx * c].view(Hkv, B, QGx, c)
        for check in ((True, False) if on_cpu else (False,)):
            # On CPU a NaN/inf in K shows in the raw scores of every query slot (padding slots are
            # zeros: 0 * inf is NaN) and one in V in p @ V (0 * NaN is NaN): two small checks,
            # no pass over the chunk. Then, and only then, the chunk is cleaned and run again.
            for h in range(Hkv):
                torch.bmm(qp[h], kf[:, :, h].transpose(1, 2), out=s[h])
            if not on_cpu:  # no host sync: the probe row found K's non-finite keys
                k_bad = ~torch.isfinite(s[:, :, QG])  # [Hkv, B, c]
                first_bad = torch.minimum(first_bad, torch.where(k_bad, pos, no_bad).amin(dim=-1).t())
                s = s[:, :, :QG]
                # One query per request (DCP): nothing is hidden, nothing cleaned (module doc).
                # Several: a later query's key is hidden from an earlier one, so V is searched and
                # cleaned (weight 0 times NaN must not reach it); hidden K scores are masked anyway.
                if masked and Qm > 1:
                    first_bad = torch.minimum(first_bad, _first_nonfinite(vf, None, pos, no_bad, q.dtype))
                    vf.nan_to_num_(0.0, 0.0, 0.0)  # for MLA a view of K, already scored
            if check and not all_finite(s):
                first_bad = torch.minimum(first_bad, _first_nonfinite(kf, v_sep, pos, no_bad, q.dtype))
                _clean(kf, v_sep)
                continue
            if masked:
                hidden = pos.view(1, 1, -1) >= vis[:, :, None]  # [B, Qm, c]
                s.view(Hkv, B, Qm, G, c).masked_fill_(hidden[None, :, :, None, :], float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
            p = torch.exp_(s.sub_(m_safe[..., None]))
            for h in range(Hkv):
                torch.bmm(p[h], vf[:, :, h], out=pv[h])
            if check and not all_finite(pv):
                first_bad = torch.minimum(first_bad, _first_nonfinite(kf, v_sep, pos, no_bad, q.dtype))
                _clean(kf, v_sep)
                continue
            alpha = torch.exp(m - m_safe)
            l.mul_(alpha).add_(p.sum(dim=-1))
            acc.mul_(alpha[..., None]).add_(pv)
            m = m_new
            break

    seen = l > 0
    o = acc / l.masked_fill(~seen, 1.0)[..., None]
    row_lse = torch.where(seen, m + torch.log(l.masked_fill(~seen, 1.0)), torch.full_like(m, float("-inf")))
    o = o.view(Hkv, B, Qm, G, Dv).permute(1, 2, 0, 3, 4).reshape(B, Qm, Hq, Dv)
    row_lse = row_lse.view(Hkv, B, Qm, G).permute(1, 2, 0, 3).reshape(B, Qm, Hq)
    out.copy_(o[req, slot])
    lse.copy_(row_lse[req, slot])
    # Poisoned rows -> NaN: the query is not finite, a key or value it sees is not, or (finite but
    # absurd input) its result overflowed. Rows that see no key stay (0, -inf).
    t_vis = visible_lens.to(torch.int64)[:, None]  # [T, 1]
    kv_bad = (t_vis > first_bad[req]).repeat_interleave(G, dim=1)  # [T, Hq]
    sees = t_vis > 0
    poisoned = sees & (q_bad | kv_bad | ~torch.isfinite(lse) | bad_rows(out))
    poison_(out, lse, poisoned)
    return out, lse


def _first_nonfinite(kf: torch.Tensor, vf: torch.Tensor | None, pos: torch.Tensor, none: int,
                     src: torch.dtype) -> torch.Tensor:
    """``[B, Hkv]``: the first position in ``pos [c]`` whose key or value (``[B, c, Hkv, D]``, the
    compute-dtype copy of ``src`` data) is not finite (``none`` where none is)."""
    bad = bad_rows(kf, src)  # [B, c, Hkv]
    if vf is not None:
        bad |= bad_rows(vf, src)
    return torch.where(bad, pos[None, :, None], none).amin(dim=1)


def _clean(kf: torch.Tensor, vf: torch.Tensor | None) -> None:
    """Zero the non-finite values in place (for MLA, V is a view of K: cleaned with it), so that
    masked keys' weight 0 times NaN cannot reach the queries that do not see them."""
    kf.nan_to_num_(0.0, 0.0, 0.0)
    if vf is not None:
        vf.nan_to_num_(0.0, 0.0, 0.0)


def _chunk_blocks(B: int, Hq: int, Hkv: int, Dqk: int, Dv: int, Qm: int, bs: int, max_kv_len: int) -> int:
    """Blocks per chunk: whole blocks, bounded by the largest temporary (``_CHUNK_ELEMS``)."""
    per_pos = B * max(Hkv * max(Dqk, Dv), Hq * Qm)
    return max(1, min(_CHUNK_ELEMS // max(per_pos * bs, 1), -(-max_kv_len // bs)))


def reserve(workspace: dict, *, max_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int,
            block_size: int, max_kv_len: int, dtype: torch.dtype, device, mla: bool) -> None:
    """Allocate into ``workspace`` the chunk buffers of every call with one query per request
    (how DCP runs this kernel), up to ``max_tokens`` of them and ``max_kv_len`` visible keys, so
    that those calls allocate none (docs/serving.md, "What run allocates")."""
    G = num_heads // num_kv_heads

    def rows(B):
        return B * _chunk_blocks(B, num_heads, num_kv_heads, head_dim, v_head_dim, 1, block_size, max_kv_len) * block_size

    # Past B0 a chunk is one block (rows = B * block_size, largest at max_tokens); below, try each B.
    B0 = _CHUNK_ELEMS // max(num_kv_heads * max(head_dim, v_head_dim), num_heads) // block_size + 1
    most = max([rows(max_tokens)] + [rows(B) for B in range(1, min(B0, max_tokens) + 1)])
    _Buffers.take(workspace, most, num_kv_heads, head_dim, v_head_dim, G + 1, dtype, _compute_dtype(dtype),
                  torch.device(device), with_v=not mla)


class _Buffers:
    """Chunk buffers: gathered blocks in the cache dtype, their compute-dtype copy, the scores."""

    def __init__(self, rows: int, hkv: int, dqk: int, dv: int, qg: int, dtype, cd, dev, *, with_v: bool):
        def alloc(d, dt):
            return torch.empty(rows * hkv * d, dtype=dt, device=dev)

        self.rows, self.qg = rows, qg
        self.raw = {"k": alloc(dqk, dtype), "v": alloc(dv, dtype) if with_v else None}
        self.conv = {"k": alloc(dqk, cd) if dtype != cd else None,
                    "v": alloc(dv, cd) if with_v and dtype != cd else None}
        self.scores = torch.empty(hkv * qg * rows, dtype=cd, device=dev)

    @classmethod
    def take(cls, workspace: dict | None, rows: int, hkv: int, dqk: int, dv: int, qg: int, dtype, cd, dev, *,
             with_v: bool) -> "_Buffers":
        """Buffers for ``rows`` gathered rows and ``qg`` score rows: ``workspace``'s when they are
        large enough (otherwise new ones, kept there for the next call)."""
        if workspace is None:
            return cls(rows, hkv, dqk, dv, qg, dtype, cd, dev, with_v=with_v)
        key = ("pytorch.paged", dtype, hkv, dqk, dv, with_v, str(dev))
        have = workspace.get(key)
        if have is None or have.rows < rows or have.qg < qg:
            have = workspace[key] = cls(max(rows, getattr(have, "rows", 0)), hkv, dqk, dv,
                                        max(qg, getattr(have, "qg", 0)), dtype, cd, dev, with_v=with_v)
        return have

    def gather(self, cache: torch.Tensor, ids: torch.Tensor, which: str, B: int, c: int, dead):
        """Blocks ``ids`` of ``cache`` in the compute dtype, ``[B, c, Hkv, D]``; rows under ``dead``
        zeroed."""
        nb, bs, hkv, d = ids.numel(), cache.shape[1], cache.shape[2], cache.shape[3]
        raw = self.raw[which][: nb * bs * hkv * d].view(nb, bs, hkv, d)
        torch.index_select(cache, 0, ids, out=raw)
        raw = raw.view(B, c, hkv, d)
        if dead is not None:
            raw.masked_fill_(dead, 0)
        if self.conv[which] is None:
            return raw
        f = self.conv[which][: raw.numel()].view(B, c, hkv, d)
        return f.copy_(raw)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32; float64 for float32 queries (the registry's contract: the partial is merged
    across ranks before the public float32 LSE is formed)."""
    return torch.float64 if dtype == torch.float32 else torch.float32
