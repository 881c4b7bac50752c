"""cpattn.layout against a plain loop that deals tokens out in runs of ``interleave``."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn import layout
from conftest import examples


def deal(L: int, world: int, il: int) -> tuple[list[int], list[int], list[int]]:
    """The plain loop: owner and local position of each of ``L`` tokens, and local lengths."""
    counts = [0] * world
    owners, locals_ = [], []
    r, run = 0, 0
    for _ in range(L):
        owners.append(r)
        locals_.append(counts[r])
        counts[r] += 1
        run += 1
        if run == il:
            r, run = (r + 1) % world, 0
    return owners, locals_, counts


sizes = st.tuples(st.integers(1, 8), st.sampled_from([1, 2, 3, 4, 8, 16]))  # world, interleave


@settings(max_examples=examples(200, 5000))
@given(wi=sizes, L=st.one_of(st.integers(0, 3), st.integers(0, 200)))
def test_owner_local_and_lengths_match_loop(wi, L):
    world, il = wi
    owners, locs, counts = deal(L, world, il)
    p = torch.arange(L)
    assert layout.owner_rank(p, world, il).tolist() == owners
    assert layout.local_position(p, world, il).tolist() == locs
    for r in range(world):
        assert int(layout.dcp_local_seq_lens(torch.tensor([L]), world, r, il)) == counts[r]
    assert layout.dcp_local_seq_lens_all(torch.tensor([L]), world, il)[:, 0].tolist() == counts


@settings(max_examples=examples(100, 3000))
@given(wi=sizes, lens=st.lists(st.integers(0, 100), min_size=0, max_size=6), dt=st.sampled_from([torch.int32, torch.int64]))
def test_local_lengths_batched(wi, lens, dt):
    world, il = wi
    t = torch.tensor(lens, dtype=dt)
    allr = layout.dcp_local_seq_lens_all(t, world, il)
    assert allr.dtype == dt and allr.shape == (world, len(lens))
    for r in range(world):
        one = layout.dcp_local_seq_lens(t, world, r, il)
        assert one.dtype == dt and one.tolist() == allr[r].tolist()
        assert one.tolist() == [deal(L, world, il)[2][r] for L in lens]
    assert allr.sum(0).tolist() == lens


@settings(max_examples=examples(100, 3000))
@given(wi=sizes, nq=st.lists(st.integers(0, 4), min_size=1, max_size=5), extra=st.lists(st.integers(0, 20), min_size=5, max_size=5))
def test_query_positions_are_last_tokens(wi, nq, extra):
    lens = [n + e for n, e in zip(nq, extra)]
    qsl = torch.tensor([0] + nq).cumsum(0)
    pos, req = layout.query_positions(torch.tensor(lens, dtype=torch.int32), qsl)
    want_pos = [L - n + j for L, n in zip(lens, nq) for j in range(n)]
    want_req = [b for b, n in enumerate(nq) for _ in range(n)]
    assert pos.tolist() == want_pos and req.tolist() == want_req
    ones = [max(L, 1) for L in lens]  # one query per request: each request holds at least that token
    pos1, req1 = layout.query_positions(torch.tensor(ones), None)
    assert pos1.tolist() == [L - 1 for L in ones] and req1.tolist() == list(range(len(lens)))
    if 0 in lens:  # a position of -1 came out here before
        with pytest.raises(ValueError, match=">= 1"):
            layout.query_positions(torch.tensor(lens), None)


@st.composite
def sharding(draw):
    world = draw(st.integers(1, 5))
    bs = draw(st.sampled_from([1, 2, 4, 8]))
    il = draw(st.sampled_from(sorted({1, bs} | ({2} if bs % 2 == 0 else set()))))
    lens = draw(st.lists(st.one_of(st.integers(0, 3), st.integers(0, 40)), min_size=1, max_size=4))
    return world, bs, il, lens, draw(st.booleans()), draw(st.integers(0, 3))


@settings(max_examples=examples(60, 2000))
@given(s=sharding())
def test_shard_kv_and_slot_mapping_match_loop(s):
    world, bs, il, lens, mla, spare = s
    total = sum(lens)
    k = torch.arange(total, dtype=torch.float32)[:, None, None].expand(total, 2, 3).clone()  # token id in every channel
    v = None if mla else -k[..., :2].clone()
    shards = layout.shard_kv(k, v, torch.tensor(lens), world_size=world, block_size=bs, interleave=il,
                             spare_blocks=spare, generator=torch.Generator().manual_seed(sum(lens)), fill=float("nan"))
    assert len(shards) == world
    starts = [sum(lens[:b]) for b in range(len(lens))]
    widths = {sh.block_table.shape[1] for sh in shards}
    assert len(widths) == 1
    for r, sh in enumerate(shards):
        assert sh.block_table.dtype == torch.int32 and sh.local_seq_lens.dtype == torch.int32
        assert (sh.v_cache is None) == mla
        flat = sh.k_cache.reshape(-1, 2, 3)
        seen_blocks = set()
        for b, L in enumerate(lens):
            owners, locs, counts = deal(L, world, il)
            assert int(sh.local_seq_lens[b]) == counts[r]
            nblk = -(-counts[r] // bs)
            ids = sh.block_table[b, :nblk].tolist()
            assert not seen_blocks & set(ids), "a block is shared by two requests"
            seen_blocks |= set(ids)
            # every token this rank owns sits at its local position, and slot_mapping points there
            mine = [p for p in range(L) if owners[p] == r]
            slots = layout.slot_mapping(torch.arange(L), torch.full((L,), b), sh.block_table, bs,
                                        world_size=world, rank=r, interleave=il)
            for p in range(L):
                if owners[p] != r:
                    assert int(slots[p]) == -1
                    continue
                lp = locs[p]
                assert int(slots[p]) == ids[lp // bs] * bs + lp % bs
                assert flat[int(slots[p]), 0, 0] == starts[b] + p
                if v is not None:
                    assert sh.v_cache.reshape(-1, 2, 2)[int(slots[p]), 0, 0] == -(starts[b] + p)
            assert len(mine) == counts[r]
        # blocks no request uses stay filled with the fill value
        unused = set(range(sh.k_cache.shape[0])) - seen_blocks
        assert len(unused) >= spare
        for u in unused:
            assert torch.isnan(sh.k_cache[u]).all()


@settings(max_examples=examples(30, 1000))
@given(s=sharding())
def test_shard_paged_cache_equals_shard_kv(s):
    world, bs, il, lens, mla, _ = s
    total = sum(lens)
    k = torch.randn(total, 1, 4)
    src_bs = 4
    need = [-(-L // src_bs) for L in lens]
    table = torch.zeros(len(lens), max(need + [1]), dtype=torch.int32)
    cache = torch.zeros(sum(need) + 1, src_bs, 1, 4)
    nxt = 1
    for b, L in enumerate(lens):
        for j in range(need[b]):
            table[b, j] = nxt
            n = min(src_bs, L - j * src_bs)
            cache[nxt, :n] = k[sum(lens[:b]) + j * src_bs: sum(lens[:b]) + j * src_bs + n]
            nxt += 1
    a = layout.shard_paged_cache(cache, None, table, torch.tensor(lens), world_size=world, interleave=il, block_size=bs)
    b_ = layout.shard_kv(k, None, torch.tensor(lens), world_size=world, interleave=il, block_size=bs)
    for x, y in zip(a, b_):
        assert torch.equal(x.k_cache, y.k_cache) and torch.equal(x.block_table, y.block_table)


def test_validation_names_the_argument():
    with pytest.raises(ValueError, match="block_size .*multiple of interleave"):
        layout.slot_mapping(torch.arange(3), torch.zeros(3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.int32), 4,
                            world_size=2, rank=0, interleave=3)
    with pytest.raises(ValueError, match="world_size must be > 0"):
        layout.owner_rank(torch.arange(3), 0)
    with pytest.raises(ValueError, match="interleave must be > 0"):
        layout.dcp_local_seq_lens(torch.arange(3), 2, 0, 0)
    with pytest.raises(ValueError, match="rank must be in"):
        layout.dcp_local_seq_lens(torch.arange(3), 2, 2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        layout.local_position(torch.arange(3), 2.0)
    with pytest.raises(ValueError, match="block_size .*multiple of interleave"):
        layout.shard_kv(torch.zeros(3, 1, 1), None, torch.tensor([3]), world_size=2, block_size=6, interleave=4)


I32 = torch.int32


@pytest.mark.parametrize("call, exc, word", [
    # negative positions / lengths: garbage out before (issue 11, item 10)
    (lambda: layout.owner_rank(torch.tensor([3, -1]), 2), ValueError, "positions must be >= 0"),
    (lambda: layout.local_position(torch.tensor([-4]), 2, 2), ValueError, "positions must be >= 0"),
    (lambda: layout.dcp_local_seq_lens(torch.tensor([-3]), 2, 0), ValueError, "seq_lens must be >= 0"),
    (lambda: layout.dcp_local_seq_lens_all(torch.tensor([5, -3]), 2), ValueError, "seq_lens must be >= 0"),
    (lambda: layout.query_positions(torch.tensor([-2]), torch.tensor([0, 1])), ValueError, "seq_lens must be >= 0"),
    (lambda: layout.query_positions(torch.tensor([2]), torch.tensor([0, 3])), ValueError, "3 query tokens but seq_lens"),
    (lambda: layout.query_positions(torch.tensor([2, 4]), torch.tensor([0, 2, 1])), ValueError, "never decrease"),
    (lambda: layout.query_positions(torch.tensor([2, 4]), torch.tensor([0, 2])), ValueError, r"\[B\+1\]"),
    (lambda: layout.query_positions(torch.tensor([0]), None), ValueError, ">= 1"),
    (lambda: layout.query_positions(torch.tensor([3]), torch.tensor([0, 1]), 5), ValueError, "num_tokens"),
    (lambda: layout.slot_mapping(torch.tensor([-1]), torch.tensor([0]), torch.zeros(1, 2, dtype=I32), 4,
                                 world_size=2, rank=0), ValueError, "positions must be >= 0"),
    (lambda: layout.shard_kv(torch.zeros(3, 1, 1), None, torch.tensor([-3]), world_size=2, block_size=4),
     ValueError, "seq_lens must be >= 0"),
    (lambda: layout.shard_paged_cache(torch.zeros(2, 4, 1, 1), None, torch.zeros(1, 2, dtype=I32), torch.tensor([-3]),
                                      world_size=2), ValueError, "seq_lens must be >= 0"),
    # out-of-range indices: raw IndexError before
    (lambda: layout.slot_mapping(torch.tensor([100]), torch.tensor([0]), torch.zeros(1, 2, dtype=I32), 4,
                                 world_size=2, rank=0), ValueError, "block column"),
    (lambda: layout.slot_mapping(torch.tensor([1]), torch.tensor([5]), torch.zeros(1, 2, dtype=I32), 4,
                                 world_size=2, rank=0), ValueError, "request 5"),
    (lambda: layout.slot_mapping(torch.tensor([1, 2]), torch.tensor([0]), torch.zeros(1, 2, dtype=I32), 4,
                                 world_size=2, rank=0), ValueError, "req_indices must have the shape"),
    (lambda: layout.shard_paged_cache(torch.zeros(2, 4, 1, 1), None, torch.tensor([[7, 9]]), torch.tensor([3]),
                                      world_size=2), ValueError, "block 7"),
    # wrong types: raw AttributeError / TypeError from torch before
    (lambda: layout.owner_rank([1, 2], 2), TypeError, "positions must be an integer torch.Tensor"),
    (lambda: layout.dcp_local_seq_lens([3], 2, 0), TypeError, "seq_lens must be an integer torch.Tensor"),
    (lambda: layout.dcp_local_seq_lens(torch.tensor([3.0]), 2, 0), TypeError, "integer dtype"),
    (lambda: layout.dcp_local_seq_lens_all([3], 2), TypeError, "seq_lens"),
    (lambda: layout.query_positions([2], None), TypeError, "seq_lens"),
    (lambda: layout.query_positions(torch.tensor([2]), [0, 1]), TypeError, "query_start_loc"),
    (lambda: layout.slot_mapping(torch.tensor([1]), torch.tensor([0]), [[0, 1]], 4, world_size=2, rank=0),
     TypeError, "block_table"),
    (lambda: layout.shard_kv(torch.zeros(3, 1, 1), None, [3], world_size=2, block_size=4), TypeError, "seq_lens"),
    (lambda: layout.shard_kv([1, 2, 3], None, torch.tensor([3]), world_size=2, block_size=4), TypeError, "k"),
    (lambda: layout.shard_kv(torch.zeros(3, 1, 1), None, torch.tensor([3]), world_size=2, block_size=4,
                             spare_blocks=-1), ValueError, "spare_blocks"),
    (lambda: layout.shard_paged_cache(torch.zeros(2, 4, 1, 1), None, [[0]], torch.tensor([3]), world_size=2),
     TypeError, "block_table"),
    (lambda: layout.shard_paged_cache([0], None, torch.zeros(1, 1, dtype=I32), torch.tensor([3]), world_size=2),
     TypeError, "k_cache"),
])
def test_bad_positions_lengths_and_types_raise_clearly(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_meta_and_valid_edge_inputs_still_work():
    assert layout.dcp_local_seq_lens(torch.tensor([5], device="meta"), 2, 0).device.type == "meta"
    assert layout.query_positions(torch.tensor([0, 3]), torch.tensor([0, 0, 2]))[0].tolist() == [1, 2]
    assert layout.owner_rank(torch.zeros(0, dtype=torch.long), 2).numel() == 0
