"""The registered op ``torch.ops.cpattn.dcp_decode_attention`` in this process (torch.distributed
not initialised: world size 1): opcheck, the fake implementation, local errors."""
from __future__ import annotations

import pytest
import torch

import cpattn
from _dcp_ranks import local_inputs
from test_dcp import check_case

CASES = [
    {"seed": 4, "world": 1, "bs": 4, "il": 4, "mla": False, "heads": "replicated", "hq": 4, "hkv": 2, "dqk": 8,
     "dv": 6, "lens": [1, 9, 5], "nq": [1, 3, 2], "dtype": "float32"},
    {"seed": 6, "world": 1, "bs": 2, "il": 1, "mla": True, "heads": "sharded", "hq": 3, "hkv": 1, "dqk": 10,
     "dv": 8, "lens": [0, 7], "nq": [0, 2], "dtype": "bfloat16"},
]


def _args(inp, combine=""):
    return (inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], inp["query_start_loc"],
            "", inp["interleave"], None, inp["v_head_dim"], inp["heads"], combine, None)


@pytest.mark.parametrize("p", CASES, ids=["gqa", "mla"])
def test_opcheck(p):
    inp = local_inputs(p, 1, 0)
    for k in ("k_cache", "v_cache"):  # opcheck compares outputs; NaN in unused blocks is fine, but keep it tidy
        if inp[k] is not None:
            inp[k] = inp[k].nan_to_num(0.0)
    torch.library.opcheck(torch.ops.cpattn.dcp_decode_attention.default, _args(inp))


@pytest.mark.parametrize("p", CASES, ids=["gqa", "mla"])
def test_world_one_without_torch_distributed(p):
    inp = local_inputs(p, 1, 0)
    out, lse = cpattn.dcp_decode_attention(
        inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], group=None,
        query_start_loc=inp["query_start_loc"], interleave=inp["interleave"], v_head_dim=inp["v_head_dim"],
        heads=inp["heads"], return_lse=True)
    check_case(p, [{"default": (out, lse, [])}])
    only_out = cpattn.dcp_decode_attention(
        inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], group=None,
        query_start_loc=inp["query_start_loc"], interleave=inp["interleave"], v_head_dim=inp["v_head_dim"],
        heads=inp["heads"])
    assert torch.equal(only_out, out)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    inp = local_inputs(CASES[0], 1, 0)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in _args(inp)]
        out, lse = torch.ops.cpattn.dcp_decode_attention(*fake)
    assert out.shape == (6, 4, 6) and out.dtype == torch.float32 and lse.shape == (6, 4) and lse.dtype == torch.float32


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(q=lambda x: x.double()), TypeError, "q must have dtype"),
    (dict(q=lambda x: x[:, :3]), ValueError, r"query heads \(3\) must be a multiple of k_cache's KV heads \(2\)"),
    (dict(k_cache=lambda x: x[..., :4]), ValueError, "k_cache head dim"),
    (dict(v_cache=lambda x: x[:, :, :1]), ValueError, "v_cache must be"),
    (dict(block_table=lambda x: x.float()), TypeError, "block_table must have dtype"),
    (dict(seq_lens=lambda x: x[:2]), ValueError, "block_table must have one row per request"),
    (dict(query_start_loc=lambda x: x.flip(0)), ValueError, "query_start_loc must start at 0"),
    (dict(seq_lens=lambda x: x * 0), ValueError, r"shorter than its \d query token"),
    (dict(query_start_loc=lambda x: None), ValueError, "without query_start_loc, q must have one token per request"),
])
def test_local_errors(change, exc, pattern):
    inp = local_inputs(CASES[0], 1, 0)
    for k, f in change.items():
        inp[k] = f(inp[k])
    with pytest.raises(exc, match=pattern):
        cpattn.dcp_decode_attention(
            inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], group=None,
            query_start_loc=inp["query_start_loc"], interleave=inp["interleave"], v_head_dim=inp["v_head_dim"],
            heads=inp["heads"])


def test_bad_options():
    inp = local_inputs(CASES[0], 1, 0)
    call = lambda **kw: cpattn.dcp_decode_attention(  # noqa: E731
        inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], group=None,
        query_start_loc=inp["query_start_loc"], **kw)
    with pytest.raises(ValueError, match="heads must be 'replicated' or 'sharded'"):
        call(heads="split")
    with pytest.raises(ValueError, match="combine='ring' is not available"):
        call(combine="ring")
    with pytest.raises(ValueError, match="scale must be finite"):
        call(scale=float("nan"))
    with pytest.raises(ValueError, match="interleave must be > 0"):
        call(interleave=0)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        call(backend="nope")


def test_mixed_batch_is_not_padded(monkeypatch):
    """Decode tokens batched with a long chunk: one kernel call in which every query token is its
    own one-token request (its request's block-table row), so no query is padded to the longest
    request (the plan/run layout, no data-dependent shapes), and the result matches the oracle."""
    from cpattn.backends.pytorch import paged

    p = {"seed": 11, "world": 1, "bs": 4, "il": 1, "mla": False, "heads": "replicated", "hq": 4, "hkv": 2, "dqk": 8,
         "dv": 8, "lens": [5, 40, 3, 64, 9, 2], "nq": [1, 33, 1, 2, 3, 1], "dtype": "float32"}
    calls = []
    real = paged.paged_attention

    def spy(**kw):
        calls.append((kw["block_table"].shape[0], kw["max_query_len"], kw["q"].shape[0]))
        o, l = real(**kw)
        return o, l.float()  # like a kernel that keeps float32 LSEs for float32 queries (Triton)

    monkeypatch.setitem(cpattn.backends.get_backend("pytorch").kernels["paged_attention"].__dict__, "fn", spy)
    inp = local_inputs(p, 1, 0)
    out, lse = cpattn.dcp_decode_attention(
        inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seq_lens"], group=None,
        query_start_loc=inp["query_start_loc"], heads="replicated", return_lse=True, backend="pytorch")
    check_case(p, [{"default": (out, lse, [])}])
    assert calls == [(41, 1, 41)]  # T = 41 tokens, max_query_len 1: no padding at all
