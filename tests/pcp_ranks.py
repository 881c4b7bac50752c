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
    cpattn.pcp_ring_prefill(q, k, v, cu, group=None, causal=True, method=method)
    return "no error"
