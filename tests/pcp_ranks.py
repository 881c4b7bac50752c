"""Rank-side functions for the PCP tests (module-level: GlooWorld pickles them by reference).

Every rank builds the same global batch from a seed, takes its own rows through
``pcp_partition(...).index``, runs the op, and returns its rows (and LSE) for the test process
to compare with the float64 oracle.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import cpattn
from cpattn.testing import gloo as G


def make_batch(seed: int, lens, hq: int, hkv: int, dqk: int, dv: int, dtype: torch.dtype):
    """The global packed batch: ``q [T, Hq, Dqk]``, ``k [T, Hkv, Dqk]``, ``v [T, Hkv, Dv]``, cu."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = torch.randn(t, hq, dqk, generator=g).to(dtype)
    k = torch.randn(t, hkv, dqk, generator=g).to(dtype)
    v = torch.randn(t, hkv, dv, generator=g).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(list(lens), dtype=torch.int64).cumsum(0).tolist()), dtype=torch.int64)
    return q, k, v, cu


def prefill(seed, lens, hq, hkv, dqk, dv, dtype, causal, method, scale=None, backend=None):
    """This rank's ``(index, out, lse)`` of one PCP prefill over the group of all ranks."""
    q, k, v, cu = make_batch(seed, lens, hq, hkv, dqk, dv, dtype)
    part = cpattn.pcp_partition(cu, G.WORLD, G.RANK)
    i = part.index
    out, lse = cpattn.pcp_ring_prefill(q[i], k[i], v[i], cu, group=None, causal=causal, scale=scale,
                                       method=method, return_lse=True, backend=backend)
    return i, out, lse


def ring_bytes(seed, lens, hq, hkv, dqk, dv, dtype):
    """Bytes this rank sent in one ring prefill (cpattn.ring.last_times)."""
    from cpattn import ring

    prefill(seed, lens, hq, hkv, dqk, dv, dtype, True, "ring")
    return ring.last_times.bytes_sent


def prefill_subgroup(seed, lens, causal, method):
    """PCP over a subgroup (the odd ranks) passed explicitly; the other ranks do nothing."""
    ranks = [r for r in range(G.WORLD) if r % 2 == 1]
    sub = dist.new_group(ranks)
    if G.RANK not in ranks:
        return None
    q, k, v, cu = make_batch(seed, lens, 4, 2, 16, 16, torch.float32)
    part = cpattn.pcp_partition(cu, len(ranks), ranks.index(G.RANK))
    i = part.index
    out = cpattn.pcp_ring_prefill(q[i], k[i], v[i], cu, group=sub, causal=causal, method=method)
    return i, out


def bad_input(kind: str, method: str):
    """Every rank calls the op; ``kind`` spoils the input on rank 1 (or all ranks). Returns what
    the op left in the output buffers' place: nothing (it must raise)."""
    lens = [37, 5, 64]
    q, k, v, cu = make_batch(1, lens, 4, 2, 16, 8, torch.float32)
    world, rank = G.WORLD, G.RANK
    part = cpattn.pcp_partition(cu, world, rank)
    i = part.index
    q, k, v = q[i], k[i], v[i]
    spoil = rank == 1
    if kind == "cu_differs" and spoil:
        cu = torch.tensor([0, 38, 42, 106])
    elif kind == "cu_vs_rows":  # every rank: the batch is longer than the rows given
        cu = torch.tensor([0, 37, 42, 130])
    elif kind == "wrong_world":  # every rank partitioned for a group of twice the size
        part = cpattn.pcp_partition(cu, 2 * world, rank)
        qa, ka, va, _ = make_batch(1, lens, 4, 2, 16, 8, torch.float32)
        q, k, v = qa[part.index], ka[part.index], va[part.index]
    elif kind == "dtype" and spoil:
        k = k.to(torch.float64)
    elif kind == "dtype_across" and spoil:
        q, k, v = q.double(), k.double(), v.double()
    elif kind == "heads" and spoil:
        q = torch.cat([q, q[:, :1]], dim=1)  # Hq = 5 with Hkv = 2
    elif kind == "heads_across" and spoil:
        q = torch.cat([q, q], dim=1)  # Hq = 8: valid locally, differs from the other ranks
    elif kind == "not_tensor" and spoil:
        q = q.tolist()
    elif kind == "method" and spoil:
        method = "gather"
    elif kind == "kv_rows" and spoil:
        v = v[:-1]
    elif kind == "device" and spoil:  # one tensor on another device: must not reach the fake kernel alone
        v = v.to("meta")
    cpattn.pcp_ring_prefill(q, k, v, cu, group=None, causal=True, method=method)
    return "no error"


def make_context_batch(seed, lens, ctx_lens, hq, hkv, dqk, dv, dtype, mla=False):
    """Prompt batch (as :func:`make_batch`) plus each request's cached context ``kc [sum C, Hkv, Dqk]``,
    ``vc [sum C, Hkv, Dv]`` (None with ``mla``: V is then the first ``dv`` channels of K)."""
    q, k, v, cu = make_batch(seed, lens, hq, hkv, dqk, dv, dtype)
    g = torch.Generator().manual_seed(seed + 7)
    kc = torch.randn(sum(ctx_lens), hkv, dqk, generator=g).to(dtype)
    vc = None if mla else torch.randn(sum(ctx_lens), hkv, dv, generator=g).to(dtype)
    return q, k, v, cu, kc, vc


def context_oracle_inputs(seed, lens, ctx_lens, hq, hkv, dqk, dv, dtype, mla=False):
    """``(q, k_full, v_full, cu_q, cu_k)``: each request's cached keys followed by its prompt's."""
    q, k, v, cu, kc, vc = make_context_batch(seed, lens, ctx_lens, hq, hkv, dqk, dv, dtype, mla)
    vc = kc[..., :dv] if vc is None else vc
    ks, vs, cuk, c0 = [], [], [0], 0
    for b, (L, C) in enumerate(zip(lens, ctx_lens)):
        p0 = int(cu[b])
        ks += [kc[c0:c0 + C], k[p0:p0 + L]]
        vs += [vc[c0:c0 + C], v[p0:p0 + L]]
        cuk.append(cuk[-1] + C + L)
        c0 += C
    return q, torch.cat(ks), torch.cat(vs), cu, torch.tensor(cuk)


def prefill_with_context(seed, lens, ctx_lens, hq, hkv, dqk, dv, dtype, causal, method, block_size, interleave,
                         mla=False):
    """This rank's ``(index, out, lse)`` with the context sharded in the DCP layout over the group
    (spare cache blocks NaN, block ids shuffled: reading outside a request's blocks would show)."""
    from cpattn import layout

    q, k, v, cu, kc, vc = make_context_batch(seed, lens, ctx_lens, hq, hkv, dqk, dv, dtype, mla)
    shards = layout.shard_kv(kc, vc, torch.tensor(ctx_lens, dtype=torch.int32), world_size=G.WORLD,
                             block_size=block_size, interleave=interleave, spare_blocks=1,
                             generator=torch.Generator().manual_seed(seed), fill=float("nan"))
    sh = shards[G.RANK]
    ctx = cpattn.PcpContext(sh.k_cache, sh.v_cache, sh.block_table, torch.tensor(ctx_lens, dtype=torch.int32),
                            interleave)
    i = cpattn.pcp_partition(cu, G.WORLD, G.RANK).index
    out, lse = cpattn.pcp_ring_prefill(q[i], k[i], v[i], cu, group=None, causal=causal, method=method,
                                       return_lse=True, context=ctx)
    return i, out, lse


def bad_context(kind: str):
    """Cached-context input spoiled on rank 1 (``kind``); every rank must raise."""
    from cpattn import layout

    lens, ctx_lens = [20, 9], [17, 4]
    q, k, v, cu, kc, vc = make_context_batch(3, lens, ctx_lens, 4, 2, 16, 16, torch.float32)
    sh = layout.shard_kv(kc, vc, torch.tensor(ctx_lens), world_size=G.WORLD, block_size=4, interleave=1)[G.RANK]
    kcache, vcache, table, cl, il = sh.k_cache, sh.v_cache, sh.block_table, torch.tensor(ctx_lens), 1
    if G.RANK == 1:
        if kind == "ctx_lens_differ":
            cl = torch.tensor([17, 5])
        elif kind == "cache_dtype":
            kcache = kcache.double()
        elif kind == "cache_heads":
            kcache = kcache[:, :, :1]
        elif kind == "table_rows":
            table = table[:1]
        elif kind == "interleave":  # 3 does not divide the block size (4): the DCP op refuses it
            il = 3
    if kind == "interleave":
        il = 3
    i = cpattn.pcp_partition(cu, G.WORLD, G.RANK).index
    cpattn.pcp_ring_prefill(q[i], k[i], v[i], cu, group=None, context=cpattn.PcpContext(kcache, vcache, table, cl, il))
    return "no error"
