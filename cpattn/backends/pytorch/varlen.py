"""Local varlen attention with explicit positions: the compute kernel under PCP.

Kernel ``attention(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, causal, scale)``
(shapes in :func:`attention`). Causal masking compares positions, so a rank can attend its own
query chunks to any block of keys (its own, a ring neighbour's, the whole gathered prompt).

How it stays fast and small:

* Positions are cut into *runs* (maximal stretches ``p, p+1, p+2, ...``). Under a causal mask a
  query run ``[a, a+m)`` and a key run ``[c, c+n)`` meet in at most two tiles: the keys before
  ``a`` (seen by every query: no mask at all) and the keys in ``[max(a, c), a+m)`` (a causal
  triangle aligned at its top-left corner). Keys after the run's last query are never touched,
  so blocks the causal mask hides entirely cost nothing.
* On CPU each tile runs in ATen's flash-attention kernel
  (``_scaled_dot_product_flash_attention_for_cpu``, on head-major copies made once per call;
  float32 input computed in float64, see ``_FLASH_DTYPE``):
  blocked matmuls, vectorised exp, online softmax in float32, masked blocks of the triangle
  skipped, GQA without repeating KV heads, and it returns the LSE. ``Dqk != Dv`` is handled by
  zero-padding the narrower side once per call (zeros change no score and no output).
* Elsewhere (or with ``USE_ATEN_FLASH = False``) a generic path computes each tile in float32
  for 16-bit input and float64 for float32/float64 input (float32 math would err up to ~2x
  plain float32 PyTorch), over query-row chunks of at most ``_CHUNK_ELEMS`` scores.
* A query run covered by one tile is written straight to the output; the partials of one covered
  by a few tiles are merged once by the chunked merge kernel, rounded once to the output dtype; a
  run with many tiles (scattered positions) streams them into an accumulator instead. Merging
  runs in float32 for 16-bit inputs and in float64 for float32/float64 inputs, so it adds no
  error visible at the input's precision.

Scale: any finite value. ATen's flash kernel applies its causal mask in a way that assumes a
positive scale (a negative or zero scale gave NaN or wrong rows), so the flash path folds the
sign into its head-major copy of ``q`` (``q.k * s == (-q).k * |s|``, exact) and runs a zero scale
as zero queries with scale 1 (every visible score 0, exact).

NaN and inf are never hidden (:mod:`cpattn.reference`'s rule): one host check of ``q``, ``k``
and ``v`` per call (the kernel reads ``cu_seqlens`` on the host anyway; a min/max pass over the
inputs is small next to the attention). When something is not finite the kernel runs on copies
with those values zeroed (so a masked key's weight 0 times NaN cannot reach a row that does not
see it; on the flash path the head-major copies are cleaned in place) and then writes NaN
(``out`` and ``lse``) into every row that sees a key and whose query, or the key or value of a
key it sees, is not finite. ATen's flash kernel alone would hide some of them (a NaN query came
out as finite numbers). Without host reads (inside ``PcpPrefillPlan.run``) the check cannot
decide anything: the rows are always searched (two reductions, :mod:`.finite`) and the copies
always cleaned.
"""
from __future__ import annotations

import math

import torch

from ..hostsync import host_reads_allowed
from .finite import all_finite, bad_rows, poison_
from ..positions import default_positions

from .merge import merge as _merge_kernel

USE_ATEN_FLASH = True
_MAX_HELD_TILES = 4  # a query run with more tiles streams them into a float32 accumulator
_CHUNK_ELEMS = 1 << 22  # generic path: at most 4M scores (16 MiB float32) per chunk
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# float32 input runs the ATen kernel in float64: its float32 online softmax errs 2-3 ulps, more
# than plain float32 PyTorch (the accuracy bar: tests/tolerance.py); float64 costs about 2x.
# 16-bit inputs run natively (float32 accumulation inside, far below their rounding error).
_FLASH_DTYPE = {torch.float32: torch.float64}


def check(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False, scale=None):
    """Reasons this kernel cannot run the input (the public layer validated shapes already)."""
    reasons = []
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        reasons.append(f"dtype {q.dtype} is not supported (float32/float16/bfloat16/float64)")
    if q.shape[1] % max(k.shape[1], 1) != 0:
        reasons.append("Hq must be a multiple of Hkv")
    return reasons


def _runs(pos: torch.Tensor, cu: list[int]) -> list[list[tuple[int, int, int]]]:
    """Per sequence, its runs as ``(row_start, row_end, first_position)``."""
    n = pos.numel()
    if n == 0:
        return [[] for _ in range(len(cu) - 1)]
    start = torch.ones(n, dtype=torch.bool, device=pos.device)
    start[1:] = pos[1:] != pos[:-1] + 1
    seq_starts = torch.tensor([c for c in cu[:-1] if c < n], dtype=torch.int64, device=pos.device)
    start[seq_starts] = True
    rows = torch.nonzero(start).flatten()
    firsts = pos[rows].tolist()
    rows = rows.tolist() + [n]
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(len(cu) - 1)]
    b = 0
    for i, r0 in enumerate(rows[:-1]):
        while cu[b + 1] <= r0:
            b += 1
        out[b].append((r0, min(rows[i + 1], cu[b + 1]), firsts[i]))
    return out


def _tiles(qr: tuple[int, int, int], kr: tuple[int, int, int]):
    """Tiles ``(q0, q1, k0, k1, triangle)`` (row ranges) where query run ``qr`` sees key run ``kr``."""
    q0, q1, a = qr
    k0, k1, c = kr
    m, n = q1 - q0, k1 - k0
    tiles = []
    full = min(n, a - c)  # keys at positions < a: every query of the run sees them
    if full > 0:
        tiles.append((q0, q1, k0, k0 + full, False))
    s = max(a, c)  # triangle: queries and keys from position s up to the run's last query
    e = min(c + n, a + m)
    if e > s:
        tiles.append((q0 + (s - a), q1, k0 + (s - c), k0 + (e - c), True))
    return tiles


def _tile_flash(qh, kh, vh, triangle: bool, scale: float):
    """One tile in ATen's CPU flash kernel; ``qh [Hq, m, D]``, ``kh``/``vh [Hkv, n, D]`` head-major."""
    o, lse = _FLASH(qh[None], kh[None], vh[None], 0.0, triangle, scale=scale)
    return o[0].transpose(0, 1), lse[0].transpose(0, 1)


def _tile_generic(q, k, v, triangle: bool, scale: float):
    m, hq, d = q.shape
    n, hkv, dv = v.shape
    g = hq // hkv
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else torch.float64  # as _FLASH_DTYPE
    qf = q.to(ct).view(m, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, m, D]
    kt = k.to(ct).permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, D, n]
    vf = v.to(ct).permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, n, Dv]
    out = torch.empty(m, hq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(m, hq, dtype=ct, device=q.device)
    step = max(1, _CHUNK_ELEMS // max(hq * n, 1))
    cols = torch.arange(n, device=q.device)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        s = torch.matmul(qf[:, :, r0:r1], kt).mul_(scale)  # [Hkv, G, rows, n]
        if triangle:
            rows = torch.arange(r0, r1, device=q.device)
            s.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
        l = torch.logsumexp(s, dim=-1)
        p = torch.exp(s.sub_(l[..., None]))
        o = torch.matmul(p, vf)  # [Hkv, G, rows, Dv]
        out[r0:r1] = o.permute(2, 0, 1, 3).reshape(r1 - r0, hq, dv)
        lse[r0:r1] = l.permute(2, 0, 1).reshape(r1 - r0, hq)
    return out, lse


def _head_major(x: torch.Tensor, width: int, dtype: torch.dtype, clean: bool = False) -> torch.Tensor:
    """``[T, H, d]`` -> contiguous ``[H, T, width]`` in ``dtype`` (zero-padded channels past ``d``).
    ``clean``: NaN/inf zeroed, in the copy (which is then never ``x``'s own memory)."""
    if x.shape[-1] == width:
        xt = x.transpose(0, 1)
        out = xt.to(dtype).contiguous()
        if clean:  # in place on a fresh copy: a head-major x of the same dtype would come back as itself
            out = (out.clone() if x.dtype == dtype and xt.is_contiguous() else out).nan_to_num_(0.0, 0.0, 0.0)
        return out
    out = x.new_zeros(x.shape[1], x.shape[0], width, dtype=dtype)
    out[..., : x.shape[-1]] = x.transpose(0, 1)
    return out.nan_to_num_(0.0, 0.0, 0.0) if clean else out


def _combine(parts, out, lse, dv: int, merge_dtype: torch.dtype) -> None:
    """Write the exact merge of tile partials ``(row_offset, o, l)`` into ``out``/``lse`` (rows of
    one query run; tile ``i`` covers rows ``[offset_i, end)``), rounding once. Rows before every
    offset saw no key: ``(0, -inf)``."""
    parts = sorted(parts, key=lambda p: p[0])
    cuts = sorted({p[0] for p in parts}) + [out.shape[0]]
    if cuts[0] > 0:
        out[: cuts[0]] = 0
        lse[: cuts[0]] = float("-inf")
    for s, e in zip(cuts, cuts[1:]):
        live = [(o[s - off: e - off, :, :dv], l[s - off: e - off].to(merge_dtype)) for off, o, l in parts if off <= s]
        if len(live) == 1:
            out[s:e] = live[0][0]
            lse[s:e] = live[0][1]
        else:  # weights and accumulation in merge_dtype, one rounding
            _merge_kernel([o for o, _ in live], [l for _, l in live], out[s:e], lse[s:e])


def _fill_uncovered(out, lse, covered, cu_q) -> None:
    """Rows of no query run that saw a key (and rows past the last sequence): ``(0, -inf)``."""
    edges = [(cu_q[b], cu_q[b + 1], sorted(covered[b])) for b in range(len(cu_q) - 1)]
    edges.append((cu_q[-1], out.shape[0], []))
    for s, e, runs in edges:
        pos = s
        for r0, r1 in runs + [(e, e)]:
            if r0 > pos:
                out[pos:r0] = 0
                lse[pos:r0] = float("-inf")
            pos = max(pos, r1)


def _merge_into(acc, acc_lse, o, l) -> None:
    """``(acc, acc_lse) <- merge((acc, acc_lse), (o, l))`` in acc's dtype. Tiles only ever hold
    rows that see a key (finite ``l``); should both sides be empty, the row stays ``(0, -inf)``
    rather than turning NaN."""
    new = torch.logaddexp(acc_lse, l)
    shift = new.masked_fill(torch.isneginf(new), 0.0)
    acc.mul_(torch.exp(acc_lse - shift).unsqueeze(-1))
    acc.add_(o * torch.exp(l - shift).unsqueeze(-1))
    acc_lse.copy_(new)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions=None, k_positions=None, causal=False, scale=None,
              host=None):
    """Varlen attention of ``q`` over ``k, v`` with an optional causal mask on explicit positions.

    Args:
        q: ``[Tq, Hq, Dqk]``; k: ``[Tk, Hkv, Dqk]``; v: ``[Tk, Hkv, Dv]``; one float dtype,
            ``Hq % Hkv == 0`` (query head ``h`` uses KV head ``h // (Hq // Hkv)``). The last dim
            must have stride 1; other strides are free (``k``/``v`` may be views of one buffer).
        cu_seqlens_q, cu_seqlens_k: ``[B+1]`` int tensors delimiting the sequences of each side.
        q_positions ``[Tq]``, k_positions ``[Tk]``: int64 positions inside each sequence (causal
            only; default: keys ``0..Lk-1``, queries bottom-right aligned). Any values work;
            sorted stretches are fastest.
        causal: a query sees the keys of its sequence whose position is ``<=`` its own.
        scale: score scale (``1/sqrt(Dqk)`` when None).
        host: optional host copies a plan computed once (``{"cu_q": [...], "cu_k": [...]}`` and,
            when causal, ``"q_runs"``/``"k_runs"`` as :func:`_runs` returns them): the kernel then
            reads no tensor value on the host (``PcpPrefillPlan.run``).

    Returns:
        ``out [Tq, Hq, Dv]`` in ``q.dtype`` and ``lse [Tq, Hq]`` float32 (natural log,
        token-major). A query that sees no key gets ``out = 0``, ``lse = -inf``.
    """
    tq, hq, dqk = q.shape
    dv = v.shape[-1]
    scale = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
    if host is not None:
        cu_q, cu_k = list(host["cu_q"]), list(host["cu_k"])
    else:
        cu_q = [int(x) for x in cu_seqlens_q.tolist()]
        cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    out = torch.empty(tq, hq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(tq, hq, dtype=torch.float32, device=q.device)
    covered: list[list[tuple[int, int]]] = [[] for _ in range(len(cu_q) - 1)]
    flash = USE_ATEN_FLASH and _FLASH is not None and q.device.type == "cpu"
    # merging partials: float32 math for 16-bit inputs (rounded to 16 bits after anyway), float64
    # for float32/float64 inputs, so merging adds no error visible at the input's precision
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else torch.float64
    bad = _nonfinite(q, k, v)  # None when everything is finite (the rule)
    if bad is not None and not flash:  # run on copies with NaN/inf zeroed (flash: its copies below)
        q, k, v = (x.nan_to_num(0.0, 0.0, 0.0) for x in (q, k, v))
    if flash:
        # Head-major copies, once per call (about 15% faster tiles than strided token-major views);
        # the ATen kernel wants one head size: zero-pad the narrower side (no score or output changes).
        width = max(dqk, dv)
        qh, kh, vh = (_head_major(x, width, _FLASH_DTYPE.get(q.dtype, q.dtype), clean=bad is not None)
                      for x in (q, k, v))
        flash_scale = scale
        if scale <= 0:  # the ATen kernel's causal mask needs a positive scale: fold the sign into q
            qh = -qh if scale < 0 else torch.zeros_like(qh)  # never in place: qh may share q's memory
            flash_scale = -scale if scale < 0 else 1.0

        def tile(a, b, c, d, triangle):
            return _tile_flash(qh[:, a:b], kh[:, c:d], vh[:, c:d], triangle, flash_scale)
    else:

        def tile(a, b, c, d, triangle):
            return _tile_generic(q[a:b], k[c:d], v[c:d], triangle, scale)

    if causal and host is not None and "q_runs" in host:
        q_runs, k_runs = host["q_runs"], host["k_runs"]
    elif causal:
        if q_positions is None or k_positions is None:
            dq, dk = default_positions(cu_q, cu_k, q.device)
            q_positions = dq if q_positions is None else q_positions
            k_positions = dk if k_positions is None else k_positions
        q_runs, k_runs = _runs(q_positions, cu_q), _runs(k_positions, cu_k)
    else:
        q_runs = [[(cu_q[b], cu_q[b + 1], 0)] for b in range(len(cu_q) - 1)]
        k_runs = [[(cu_k[b], cu_k[b + 1], 0)] for b in range(len(cu_k) - 1)]
    for b in range(len(cu_q) - 1):
        for qr in q_runs[b]:
            if qr[1] <= qr[0]:
                continue
            if causal:
                tiles = [t for kr in k_runs[b] if kr[1] > kr[0] for t in _tiles(qr, kr)]
            else:
                tiles = [(qr[0], qr[1], kr[0], kr[1], False) for kr in k_runs[b] if kr[1] > kr[0]]
            if not tiles:
                continue
            r0, r1 = qr[0], qr[1]
            covered[b].append((r0, r1))
            if len(tiles) <= _MAX_HELD_TILES:  # hold the partials, merge once into the output
                parts = [(t[0] - r0, *tile(*t)) for t in tiles]
                _combine(parts, out[r0:r1], lse[r0:r1], dv, acc_dtype)
                continue
            acc = torch.zeros(r1 - r0, hq, dv, dtype=acc_dtype, device=q.device)  # stream into acc_dtype
            acc_lse = torch.full((r1 - r0, hq), float("-inf"), dtype=acc_dtype, device=q.device)
            for t in tiles:
                o, l = tile(*t)
                _merge_into(acc[t[0] - r0:], acc_lse[t[0] - r0:], o[..., :dv], l.to(acc_dtype))
            out[r0:r1] = acc
            lse[r0:r1] = acc_lse
    _fill_uncovered(out, lse, covered, cu_q)
    _poison(out, lse, bad, cu_q, cu_k, q_positions if causal else None, k_positions if causal else None)
    return out, lse


def _nonfinite(q, k, v):
    """``(q_bad [Tq, Hq], kv_bad [Tk, Hkv])`` marking rows with a NaN/inf, or None when all is finite."""
    if host_reads_allowed() and all(all_finite(x) for x in (q, k, v)):
        return None  # inside a plan's run() no host read: always the masks (and cleaned copies)
    return bad_rows(q), bad_rows(k) | bad_rows(v)


def _poison(out, lse, bad, cu_q: list[int], cu_k: list[int], q_pos, k_pos) -> None:
    """NaN into the rows that see a key and whose query, or the key/value of a key they see, is
    not finite (``bad`` from :func:`_nonfinite`), and into any row that sees a key but came out
    non-finite (finite but absurd inputs). A query at position ``p`` sees the keys of its sequence
    at positions ``<= p`` (causal) or all of them (``q_pos``/``k_pos`` None)."""
    sees = ~torch.isneginf(lse)  # the kernel ran on finite inputs: -inf exactly where no key is seen
    poisoned = sees & (~torch.isfinite(lse) | bad_rows(out))
    if bad is not None:
        q_bad, kv_bad = bad
        hq, hkv = q_bad.shape[1], kv_bad.shape[1]
        nq, nk = cu_q[-1], cu_k[-1]
        dev = out.device
        lens_q = torch.tensor([b - a for a, b in zip(cu_q, cu_q[1:])], device=dev)
        lens_k = torch.tensor([b - a for a, b in zip(cu_k, cu_k[1:])], device=dev)
        seq_q = torch.repeat_interleave(torch.arange(len(lens_q), device=dev), lens_q, output_size=nq)
        seq_k = torch.repeat_interleave(torch.arange(len(lens_k), device=dev), lens_k, output_size=nk)
        kp = torch.zeros(nk, dtype=torch.int64, device=dev) if k_pos is None else k_pos[:nk].to(device=dev, dtype=torch.int64)
        qp = torch.zeros(nq, dtype=torch.int64, device=dev) if q_pos is None else q_pos[:nq].to(device=dev, dtype=torch.int64)
        none = torch.iinfo(torch.int64).max
        # smallest position of a non-finite key/value, per sequence and KV head
        at = torch.where(kv_bad[:nk], kp[:, None], none)  # [nk, Hkv]
        first = torch.full((len(lens_k), hkv), none, dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, seq_k[:, None].expand(nk, hkv), at, "amin")
        sees_bad = (qp[:, None] >= first[seq_q]).repeat_interleave(hq // hkv, dim=1)  # [nq, Hq]
        poisoned[:nq] |= sees[:nq] & (q_bad[:nq] | sees_bad)
    poison_(out, lse, poisoned)
