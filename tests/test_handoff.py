"""PCP -> DCP hand-off (cpattn.pcp_to_dcp_handoff) and the block allocator it uses.

* routes (host arithmetic, property-based): every prompt token is received exactly once, by its
  DCP owner, and what rank s sends to rank d is what d expects from s;
* on real gloo ranks (worlds 1-3): after the hand-off every rank's paged cache holds exactly the
  rows :func:`cpattn.layout.shard_kv` would put there (global positions offset by the cached
  context), bit for bit, and no other slot was written (caches start as NaN);
* bad input on one rank raises on every rank and writes nothing.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn import handoff, layout
from cpattn.testing.gloo import RankErrors

import handoff_ranks as HR
from conftest import examples



@settings(max_examples=examples(60, 5000))
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=5), n=st.integers(1, 4), il=st.sampled_from([1, 2, 4]),
       data=st.data())
def test_routes_cover_every_token_once_at_its_owner(lens, n, il, data):
    ctx = data.draw(st.lists(st.integers(0, 9), min_size=len(lens), max_size=len(lens)))
    cu = [0]
    for L in lens:
        cu.append(cu[-1] + L)
    routes = [handoff.handoff_routes(cu, n, r, il, ctx) for r in range(n)]
    got = set()
    for d, (_, _, pos, req, recv) in enumerate(routes):
        assert sum(recv) == pos.numel() == req.numel()
        assert bool((layout.owner_rank(pos, n, il) == d).all())
        for p, b in zip(pos.tolist(), req.tolist()):
            assert ctx[b] <= p < ctx[b] + lens[b]
            assert (b, p) not in got
            got.add((b, p))
        for s in range(n):
            assert routes[s][1][d] == recv[s]  # s sends to d what d expects from s
    assert len(got) == sum(lens)
    for s, (order, send, *_rest) in enumerate(routes):
        assert sorted(order.tolist()) == list(range(sum(send)))


@settings(max_examples=examples(60, 3000))
@given(lens=st.lists(st.integers(0, 70), min_size=1, max_size=5), n=st.integers(1, 4), il=st.sampled_from([1, 2, 4]),
       bs_mult=st.integers(1, 3), first=st.integers(0, 5))
def test_allocate_block_table(lens, n, il, bs_mult, first):
    bs = il * bs_mult
    seq = torch.tensor(lens)
    tables = [layout.allocate_block_table(seq, world_size=n, rank=r, block_size=bs, interleave=il, first_block=first)
              for r in range(n)]
    assert len({tuple(t.shape) for t, _ in tables}) == 1
    for r, (t, nb) in enumerate(tables):
        assert t.dtype == torch.int32
        local = layout.dcp_local_seq_lens(seq, n, r, il)
        used = []
        for b, ln in enumerate(local.tolist()):
            k = -(-ln // bs)
            assert t.shape[1] * bs >= ln
            used += t[b, :k].tolist()
        assert sorted(used) == list(range(first, first + nb))  # every block once, none shared


def _expected(seed, lens, ctx_lens, n, r, il, table, bs, hkv, dk, dv):
    """What rank r's caches must hold: prompt rows at their DCP slots, NaN everywhere else."""
    k, v, _ = HR.make_rows(seed, lens, hkv, dk, dv)
    nblk = int(table.max()) + 2
    ek = torch.full((nblk, bs, hkv, dk), float("nan"))
    ev = torch.full((nblk, bs, hkv, dv), float("nan"))
    start = 0
    for b, (L, C) in enumerate(zip(lens, ctx_lens)):
        p = torch.arange(C, C + L)
        mine = layout.owner_rank(p, n, il) == r
        slots = layout.slot_mapping(p[mine], torch.full((int(mine.sum()),), b), table, bs, world_size=n, rank=r,
                                    interleave=il)
        ek.view(-1, hkv, dk)[slots] = k[start:start + L][mine]
        ev.view(-1, hkv, dv)[slots] = v[start:start + L][mine]
        start += L
    return ek, ev


CASES = [
    # lens (incl. 0, 1, shorter than N, not divisible by 2N), context lens, block_size, interleave
    ([7, 1, 0, 13], [0, 0, 0, 0], 4, 1),
    ([5, 2, 19], [3, 0, 6], 4, 2),
    ([16, 33, 2], [0, 5, 0], 4, 4),
    ([1, 0, 1], [0, 0, 2], 4, 2),  # ranks >= 1 hold no prompt row (they still send and receive)
]


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=["il1", "il2_ctx", "il_bs_ctx", "empty_ranks"])
def test_handoff_places_every_row_at_its_owner(gloo, world, case):
    lens, ctx, bs, il = case
    res = gloo(world).run(HR.handoff, 11, lens, ctx, 2, 8, 6, bs, il)
    for r, (kc, vc, table) in enumerate(res):
        ek, ev = _expected(11, lens, ctx, world, r, il, table, bs, 2, 8, 6)
        assert kc.shape[0] <= ek.shape[0] or bool(kc[ek.shape[0]:].isnan().all())
        m = min(kc.shape[0], ek.shape[0])
        assert torch.equal(kc[:m].nan_to_num(123.0), ek[:m].nan_to_num(123.0)), f"rank {r}: k cache"
        assert torch.equal(vc[:m].nan_to_num(123.0), ev[:m].nan_to_num(123.0)), f"rank {r}: v cache"
        written = int((~kc.isnan()).all(-1).all(-1).sum())
        assert written == sum(int((layout.owner_rank(torch.arange(c, c + L), world, il) == r).sum())
                              for L, c in zip(lens, ctx))


@pytest.mark.distributed
@pytest.mark.parametrize("spoil", ["cu_differs", "rows", "table_short", "dtype", "block_out_of_range", "interleave"])
def test_bad_input_raises_on_every_rank_and_writes_nothing(gloo, spoil):
    world = 2
    with pytest.raises(RankErrors) as ei:
        gloo(world).run(HR.handoff, 3, [9, 4, 1], [0, 2, 0], 2, 8, 6, 4, 2, 1, spoil)
    outcomes = ei.value.outcomes
    assert all(not o.ok for o in outcomes), [o.message for o in outcomes]
    for o in outcomes:
        assert o.error_type in ("ValueError", "TypeError", "CollectiveInputError"), (o.error_type, o.message)
        assert "pcp_to_dcp_handoff" in o.message
        assert "wrote into the cache" not in o.message
