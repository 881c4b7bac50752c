"""The head-tail partition: pure properties against a plain loop (no ranks needed)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn.partition
from cpattn import pcp_partition, pcp_restore
from conftest import examples

lengths = st.lists(st.integers(0, 300), min_size=0, max_size=8)
worlds = st.integers(1, 8)


def loop_partition(lens, n, r):
    """The definition, written as a plain loop: chunk c of a length-L sequence is
    [c*L//(2n), (c+1)*L//(2n)); rank r holds chunks r then 2n-1-r of every sequence."""
    index, positions, local = [], [], [0]
    start = 0
    for L in lens:
        held = 0
        for c in (r, 2 * n - 1 - r):
            for p in range(c * L // (2 * n), (c + 1) * L // (2 * n)):
                index.append(start + p)
                positions.append(p)
                held += 1
        local.append(local[-1] + held)
        start += L
    return index, positions, local


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int64)


@settings(max_examples=examples(100, 3000))
@given(lens=lengths, n=worlds, data=st.data())
def test_matches_plain_loop(lens, n, data):
    r = data.draw(st.integers(0, n - 1))
    part = pcp_partition(cu_of(lens), n, r)
    index, positions, local = loop_partition(lens, n, r)
    assert part.index.tolist() == index
    assert part.positions.tolist() == positions
    assert part.local_cu_seqlens.tolist() == local
    assert part.index.dtype == torch.int64 and part.num_tokens == len(index)


@settings(max_examples=examples(100, 3000))
@given(lens=lengths, n=worlds)
def test_every_token_exactly_once_and_restore_inverts(lens, n):
    cu = cu_of(lens)
    total = int(cu[-1])
    parts = [pcp_partition(cu, n, r) for r in range(n)]
    allidx = torch.cat([p.index for p in parts])
    assert sorted(allidx.tolist()) == list(range(total))
    x = torch.randn(total, 3)
    back = pcp_restore([x[p.index] for p in parts], cu)
    assert torch.equal(back, x)
    # positions are the index relative to the sequence start, and ascending within a sequence
    for p in parts:
        lc = p.local_cu_seqlens.tolist()
        for b in range(len(lens)):
            pos = p.positions[lc[b]:lc[b + 1]]
            assert torch.equal(p.index[lc[b]:lc[b + 1]] - cu[b], pos)
            assert bool((pos[1:] > pos[:-1]).all())


@settings(max_examples=examples(100, 3000))
@given(L=st.integers(0, 100_000), n=worlds)
def test_chunks_differ_by_at_most_one_token(L, n):
    sizes = []
    for r in range(n):
        (h0, h1), (t0, t1) = pcp_partition(torch.tensor([0, L]), n, r).runs[0]
        sizes += [h1 - h0, t1 - t0]
    assert sum(sizes) == L and max(sizes) - min(sizes) <= 1


@settings(max_examples=examples(100, 2000))
@given(n=st.integers(2, 8), data=st.data())
def test_causal_work_balanced_for_long_sequences(n, data):
    """Unmasked query-key pairs of rank r = sum over its positions p of (p + 1): within 10% of
    each other for any single sequence of at least 32 tokens per rank (no padding)."""
    L = data.draw(st.integers(32 * n, 200_000))
    work = [int((pcp_partition(torch.tensor([0, L]), n, r).positions + 1).sum()) for r in range(n)]
    assert (max(work) - min(work)) / max(work) <= 0.10, (L, n, work)


def test_short_sequences_and_world_one():
    # a 1-token sequence lives in chunk 2N-1 (rank 0's tail); 3 tokens over 4 chunks
    assert pcp_partition(torch.tensor([0, 1]), 2, 0).index.tolist() == [0]
    assert pcp_partition(torch.tensor([0, 1]), 2, 1).index.tolist() == []
    assert pcp_partition(torch.tensor([0, 3]), 2, 1).index.tolist() == [0, 1]
    assert pcp_partition(torch.tensor([0, 3]), 2, 0).index.tolist() == [2]
    p = pcp_partition([0, 5, 5, 12], 1, 0)
    assert p.index.tolist() == list(range(12)) and p.local_cu_seqlens.tolist() == [0, 5, 5, 12]


def test_returned_tensors_are_the_callers_own():
    a = pcp_partition(torch.tensor([0, 10]), 2, 0)
    a.index.zero_()
    assert pcp_partition(torch.tensor([0, 10]), 2, 0).index.tolist() == [0, 1, 7, 8, 9]


@pytest.mark.parametrize("cu, n, r, exc, word", [
    (torch.tensor([1, 4]), 2, 0, ValueError, "start at 0"),
    (torch.tensor([0, 4, 3]), 2, 0, ValueError, "never decrease"),
    (torch.tensor([[0, 4]]), 2, 0, ValueError, "1-D"),
    (torch.tensor([0.0, 4.0]), 2, 0, TypeError, "int32 or int64"),
    ("0,4", 2, 0, TypeError, "cu_seqlens"),
    (torch.tensor([0, 4]), 0, 0, ValueError, "world_size"),
    (torch.tensor([0, 4]), 2, 2, ValueError, "rank"),
    (torch.tensor([0, 4]), 2.0, 0, TypeError, "world_size"),
])
def test_bad_input_names_the_argument(cu, n, r, exc, word):
    with pytest.raises(exc, match=word):
        pcp_partition(cu, n, r)


def test_restore_checks_shapes():
    cu = torch.tensor([0, 7])
    with pytest.raises(ValueError, match=r"per_rank\[1\]"):
        pcp_restore([torch.zeros(3, 2), torch.zeros(2, 2)], cu)


@pytest.mark.parametrize("call, exc, word", [
    (lambda: cpattn.partition.pcp_chunk_bounds(-5, 2, 0), ValueError, "length must be >= 0"),
    (lambda: cpattn.partition.pcp_chunk_bounds(5.0, 2, 0), TypeError, "length must be an int"),
    (lambda: cpattn.partition.pcp_chunk_bounds(5, 2, 7), ValueError, "rank must be in"),
    (lambda: cpattn.partition.pcp_chunk_bounds(5, 0, 0), ValueError, "world_size"),
    (lambda: pcp_partition([0, -3], 2, 0), ValueError, "never decrease"),
    (lambda: pcp_partition(None, 2, 0), TypeError, "cu_seqlens"),
    (lambda: pcp_partition([0, 4], 2, -1), ValueError, "rank"),
    (lambda: pcp_restore([[1, 2]], [0, 2]), TypeError, "per_rank must be a list of tensors"),
    (lambda: pcp_restore(torch.zeros(2, 3), [0, 2]), TypeError, "per_rank must be a list of tensors"),
    (lambda: pcp_restore([torch.zeros(2)], [0, 2], world_size="1"), TypeError, "world_size"),
    (lambda: pcp_restore([torch.tensor(1.0)], [0, 1]), ValueError, "at least 1 dim"),
])
def test_bad_lengths_and_types_raise_clearly(call, exc, word):
    """Issue 11 item 10: garbage out, or a raw AttributeError, before."""
    with pytest.raises(exc, match=word):
        call()
