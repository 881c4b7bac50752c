"""cpattn.config: the seed guide's DCP constraints, with errors that say what to change."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn.config import validate_cp_config
from conftest import examples


def test_seed_guide_examples_pass():
    # DeepSeek-R1 (MLA) PCP2 TP8 DCP8, Qwen3-235B (GQA, 64 q / 4 kv heads) PCP2 TP8 DCP2
    c = validate_cp_config(tp=8, pcp=2, dcp=8, attention="mla", num_q_heads=128, interleave=128, block_size=128,
                           kv_transfer=True)
    assert (c.world_size, c.kv_head_replicas, c.q_heads_per_rank) == (16, 8, 16)
    c = validate_cp_config(tp=8, pcp=2, dcp=2, attention="gqa", num_q_heads=64, num_kv_heads=4)
    assert (c.world_size, c.kv_head_replicas, c.q_heads_per_rank) == (16, 2, 8)
    # no DCP: nothing to check even when KV heads are not replicated
    assert validate_cp_config(tp=2, attention="gqa", num_q_heads=32, num_kv_heads=8).kv_head_replicas == 1


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(tp=4, dcp=8, attention="mla"), r"MLA needs tp >= dcp.*use dcp in \[1, 2, 4\]"),
    (dict(tp=6, dcp=4, attention="mla"), r"tp % dcp == 0.*use dcp in \[1, 2, 3, 6\]"),
    (dict(tp=8, dcp=4, attention="gqa", num_q_heads=64, num_kv_heads=4),
     r"tp // num_kv_heads.*gives 2 rank\(s\) per KV head; use dcp in \[1, 2\].*num_kv_heads \* dcp = 16"),
    (dict(tp=12, dcp=2, attention="gqa", num_q_heads=24, num_kv_heads=4), r"gives 3 rank\(s\).*use dcp in \[1, 3\]"),
    (dict(tp=2, dcp=2, attention="gqa", num_q_heads=32, num_kv_heads=8), r"gives 0 rank\(s\)"),
    (dict(tp=8, interleave=3, block_size=128), r"block_size \(128\) must be a multiple of interleave \(3\)"),
    (dict(tp=8, interleave=1, block_size=128, kv_transfer=True), r"interleave must equal block_size.*set interleave=128"),
    (dict(tp=8, attention="gqa", num_q_heads=12, num_kv_heads=4), r"num_q_heads \(12\) must be divisible by tp \(8\)"),
    (dict(tp=3, attention="gqa", num_q_heads=24, num_kv_heads=4), r"tp \(3\) must be a multiple or a divisor"),
    (dict(tp=2, attention="gqa", num_q_heads=6, num_kv_heads=4), r"multiple of num_kv_heads"),
    (dict(tp=2, attention="gqa"), r"GQA needs num_q_heads and num_kv_heads"),
    (dict(tp=2, attention="mha"), r"attention must be 'mla' or 'gqa'"),
    (dict(tp=0), r"tp must be a positive int"),
    (dict(tp=2, dcp=-1), r"dcp must be a positive int"),
])
def test_errors_say_what_to_change(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_cp_config(**kwargs)


def test_types():
    with pytest.raises(TypeError, match="interleave must be a positive int"):
        validate_cp_config(tp=2, interleave=1.0)
    with pytest.raises(TypeError, match="pcp"):
        validate_cp_config(tp=2, pcp=True)


@settings(max_examples=examples(200, 5000))
@given(tp=st.integers(1, 16), dcp=st.integers(1, 16), kv=st.sampled_from([1, 2, 4, 8, 16]),
       group=st.sampled_from([1, 2, 4, 8]), mla=st.booleans(), il=st.sampled_from([1, 2, 16, 64]),
       bs=st.sampled_from([16, 64, 128]), transfer=st.booleans())
def test_accepts_exactly_the_rule(tp, dcp, kv, group, mla, il, bs, transfer):
    hq = kv * group * 16
    kw = dict(tp=tp, dcp=dcp, interleave=il, block_size=bs, kv_transfer=transfer, num_q_heads=hq)
    kw.update(attention="mla") if mla else kw.update(attention="gqa", num_kv_heads=kv)
    ok = bs % il == 0 and (not transfer or il == bs) and hq % tp == 0
    if mla:
        ok = ok and tp >= dcp and tp % dcp == 0
    else:
        ok = ok and (tp % kv == 0 or kv % tp == 0)
        ok = ok and (dcp == 1 or (tp // kv >= dcp and (tp // kv) % dcp == 0))
    if ok:
        c = validate_cp_config(**kw)
        assert c.world_size == tp and c.q_heads_per_rank == hq // tp
    else:
        with pytest.raises(ValueError, match="cp config"):
            validate_cp_config(**kw)
