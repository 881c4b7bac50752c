"""The local paged-attention kernel on one process: many chunks (tiny chunk budget), GQA and MLA,
several query tokens per request with causal prefixes, NaN in unused cache blocks and garbage
block-table entries past each request's length, against the float64 oracle."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn import layout, reference
from cpattn.backends import get_backend
from cpattn.backends.pytorch import paged
from conftest import examples
from tolerance import assert_close

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@st.composite
def kernel_cases(draw):
    mla = draw(st.booleans())
    hkv = 1 if mla else draw(st.sampled_from([1, 2, 4]))
    dv = draw(st.sampled_from([4, 8]))
    dqk = dv + draw(st.sampled_from([0, 4])) if mla else draw(st.sampled_from([4, 16]))
    B = draw(st.integers(1, 4))
    nq = [draw(st.integers(0, 4)) for _ in range(B)]
    if sum(nq) == 0:
        nq[0] = 1
    lens = [n + draw(st.integers(0, 70)) for n in nq]
    return dict(mla=mla, hkv=hkv, hq=hkv * draw(st.sampled_from([1, 3, 4])), dqk=dqk,
                dv=dv if mla else draw(st.sampled_from([4, 8, 12])), bs=draw(st.sampled_from([1, 4, 16])),
                lens=lens, nq=nq, dtype=draw(st.sampled_from(list(DT))), chunk=draw(st.sampled_from([1, 64, 4096, 1 << 21])),
                seed=draw(st.integers(0, 2**16)))


def run_kernel(c, backend="pytorch"):
    g = torch.Generator().manual_seed(c["seed"])
    dt = DT[c["dtype"]]
    total, T = sum(c["lens"]), sum(c["nq"])
    k = torch.randn(total, c["hkv"], c["dqk"], generator=g).to(dt)
    v = None if c["mla"] else torch.randn(total, c["hkv"], c["dv"], generator=g).to(dt)
    q = (torch.randn(T, c["hq"], c["dqk"], generator=g) * 2).to(dt)
    lens = torch.tensor(c["lens"])
    sh = layout.shard_kv(k, v, lens, world_size=1, block_size=c["bs"], spare_blocks=2,
                         generator=torch.Generator().manual_seed(c["seed"]), fill=float("nan"))[0]
    table = sh.block_table.clone()
    used = -(-lens // c["bs"])
    for b in range(len(c["lens"])):  # garbage past each request's blocks must never be read
        table[b, int(used[b]):] = torch.randint(-5, 10**6, (table.shape[1] - int(used[b]),), generator=g)
    qsl = torch.tensor([0] + c["nq"]).cumsum(0)
    pos, _ = layout.query_positions(lens, qsl)
    kw = dict(q=q, k_cache=sh.k_cache, v_cache=sh.v_cache, block_table=table, query_start_loc=qsl,
              visible_lens=pos + 1, scale=c["dqk"] ** -0.5, v_head_dim=c["dv"], max_query_len=max(c["nq"]),
              max_kv_len=max(c["lens"]))
    out, lse = get_backend(backend).run("paged_attention", **kw)
    vg = k[..., :c["dv"]] if c["mla"] else v
    okw = dict(cu_seqlens_q=qsl, cu_seqlens_k=torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]), causal=True)
    return out, lse, reference.attention(q, k, vg, **okw), reference.attention(q, k, vg, dtype=dt, **okw)


@settings(max_examples=examples(60, 2000))
@given(c=kernel_cases())
def test_chunked_kernel_matches_oracle(c):
    old, paged._CHUNK_ELEMS = paged._CHUNK_ELEMS, c["chunk"]  # tiny budgets: one block per chunk
    try:
        out, lse, (ro, rl), (bo, bl) = run_kernel(c)
    finally:
        paged._CHUNK_ELEMS = old
    dt = DT[c["dtype"]]
    assert out.dtype == dt and lse.dtype == (torch.float64 if dt == torch.float32 else torch.float32)
    assert_close(out, ro, bo, dtype=dt)
    assert_close(lse, rl, bl, dtype=torch.float32, what="lse")


@pytest.mark.parametrize("mla", [False, True])
def test_reference_kernel_matches_oracle(mla):
    c = dict(mla=mla, hkv=2 if not mla else 1, hq=4, dqk=8, dv=8, bs=4, lens=[0, 3, 17], nq=[0, 2, 3],
             dtype="float32", seed=1)
    out, lse, (ro, rl), (bo, bl) = run_kernel(c, backend="reference")
    assert_close(out, ro, bo, dtype=torch.float32)
    assert_close(lse, rl, bl, dtype=torch.float32, what="lse")


def test_query_with_no_visible_key_is_empty_state():
    q = torch.randn(2, 2, 4)
    k = torch.full((1, 4, 1, 4), float("nan"))  # nothing in the cache is ever valid here
    out, lse = paged.paged_attention(q, k, None, torch.zeros(2, 1, dtype=torch.int32), torch.tensor([0, 1, 2]),
                                     torch.tensor([0, 0]), 0.5, 4, 1, 0)
    assert torch.equal(out, torch.zeros(2, 2, 4)) and torch.equal(lse, torch.full((2, 2), float("-inf"), dtype=lse.dtype))
    kf = torch.randn(1, 4, 1, 4)
    out, lse = paged.paged_attention(q, kf, None, torch.zeros(2, 1, dtype=torch.int32), torch.tensor([0, 1, 2]),
                                     torch.tensor([3, 0]), 0.5, 4, 1, 3)
    assert torch.isfinite(lse[0]).all() and torch.equal(lse[1], torch.full((2,), float("-inf"), dtype=lse.dtype))
    assert torch.equal(out[1], torch.zeros(2, 4))


def test_reserve_covers_every_call_a_plan_makes():
    """The PyTorch kernel's ``reserve`` (a plan's constructor) sizes the chunk buffers for the
    largest chunk of any call with up to ``max_tokens`` one-query requests: the max over every
    batch size, computed by its closed form; a call then finds them big enough and keeps them."""
    import random

    from cpattn.backends.pytorch import paged as P

    rnd = random.Random(0)
    for _ in range(60):
        hkv, G = rnd.choice([1, 2, 8]), rnd.choice([1, 3, 16])
        d, bs = rnd.choice([8, 64, 576]), rnd.choice([1, 4, 64])
        dv, mt, kv = min(d, rnd.choice([8, 64, 512])), rnd.choice([1, 3, 17, 300]), bs * rnd.choice([1, 5, 900])
        ws = {}
        P.reserve(ws, max_tokens=mt, num_heads=hkv * G, num_kv_heads=hkv, head_dim=d, v_head_dim=dv,
                  block_size=bs, max_kv_len=kv, dtype=torch.bfloat16, device="cpu", mla=False)
        (buf,) = ws.values()
        want = max(B * P._chunk_blocks(B, hkv * G, hkv, d, dv, 1, bs, kv) * bs for B in range(1, mt + 1))
        assert buf.rows == want and buf.qg == G + 1
        B = rnd.randint(1, mt)
        again = P._Buffers.take(ws, B * P._chunk_blocks(B, hkv * G, hkv, d, dv, 1, bs, kv) * bs, hkv, d, dv, G + 1,
                                torch.bfloat16, torch.float32, torch.device("cpu"), with_v=True)
        assert again is buf
