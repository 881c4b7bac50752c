"""ContextParallelLM on real transformers model code (small random weights, float32, gloo ranks).

For every world size 1-3 and model family (Qwen2 GQA, DeepSeek-V3 MLA with a latent cache and a
YaRN softmax scale, Llama with interleave = block_size), prompts of lengths 1, 2, 5, 11, 17 in one
batch (shorter than the world size, not divisible by 2N):

* prefill logits: within 2x the error that the stock float32 model makes against the same model
  in float64 (tests/tolerance.py), at every prompt position;
* decode logits (the ones that chose each generated token): the same rule, against the float64
  model run on the prompt plus the tokens we generated;
* tokens: equal to ``model.generate(..., do_sample=False)`` of the unmodified model, prompt by
  prompt. Comparison stops at the first step where the stock model's top two logits are closer
  than ``6 * e`` (``e``: the stock float32 model's max logit error against float64 on that
  sequence): with both runs within ``e`` and ``2e`` of the exact logits, a gap above ``6e``
  decides the same token in both, below it the choice is rounding; the test says how many steps
  it compared and requires most of them.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the cpattn[transformers] extra")

import hf_ranks as H  # noqa: E402
from tolerance import assert_close, max_err, ulp_floor  # noqa: E402

PROMPT_LENS = [1, 2, 5, 11, 17]
NEW = 5


def _prompts(seed: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


_stock_cache: dict = {}


def _stock(kind: str, prompts):
    """Stock generation, its logits, and the float32 / float64 models (cached per kind)."""
    if kind not in _stock_cache:
        m32 = H.build(kind, 0)
        m64 = copy.deepcopy(m32).double()
        if hasattr(m64, "set_experts_implementation") and kind == "deepseek_v3":
            m64.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
        gens = []
        for p in prompts:
            ids = torch.tensor([p])  # all-ones mask: else generate takes prompt tokens == pad_token_id for padding
            g = m32.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
            gens.append((g.sequences[0, len(p):].tolist(), torch.cat(g.logits)))
        _stock_cache[kind] = (m32, m64, gens)
    return _stock_cache[kind]


# (model, block_size, interleave, PCP method, worlds); world 1 runs in this process (no
# torch.distributed: the single-process path), worlds 2-3 on real gloo ranks.
CASES = [("qwen2", 4, 1, "ring", [1, 2, 3]), ("deepseek_v3", 4, 1, "ring", [1, 2, 3]),
         ("llama", 4, 4, "allgather", [2, 3])]
PARAMS = [pytest.param(c[:4], w, id=f"{c[0]}-w{w}") for c in CASES for w in c[4]]


@pytest.mark.distributed
@pytest.mark.parametrize("case,world", PARAMS)
def test_matches_stock_model(gloo, world, case):
    kind, bs, il, method = case
    prompts = _prompts(7, H.CONFIGS[kind]["vocab_size"])
    if world == 1:
        res = [H.cp_run(kind, 0, prompts, NEW, bs, il, method)]
    else:
        res = gloo(world).run(H.cp_run, kind, 0, prompts, NEW, bs, il, method, timeout=400)
    toks, logits, pre, impl = res[0]
    for r in range(1, world):  # every rank returns the same results
        assert res[r][0] == toks
        for a, b in zip(res[r][2], pre):
            assert torch.equal(a, b)
    assert impl == "sdpa", "the model's attn_implementation must be restored"
    m32, m64, gens = _stock(kind, prompts)
    compared = total = 0
    with torch.no_grad():
        for b, p in enumerate(prompts):
            ref_pre = m64(torch.tensor([p])).logits[0]
            base_pre = m32(torch.tensor([p])).logits[0]
            assert_close(pre[b], ref_pre, base_pre, dtype=torch.float32, what=f"prefill logits of prompt {b}")
            # decode logits: ours chose toks[b]; exact = float64 model on prompt + our tokens
            seq = torch.tensor([p + toks[b]])
            ref = m64(seq).logits[0, len(p) - 1:len(p) - 1 + len(toks[b])]
            base = m32(seq).logits[0, len(p) - 1:len(p) - 1 + len(toks[b])]
            assert_close(logits[b], ref, base, dtype=torch.float32, what=f"decode logits of prompt {b}")
            # tokens vs stock generate, until the stock model's top two are within rounding
            stock_toks, stock_logits = gens[b]
            sseq = torch.tensor([p + stock_toks])
            e = max(max_err(m32(sseq).logits[0], m64(sseq).logits[0]), ulp_floor(stock_logits, torch.float32))
            total += len(stock_toks)
            for i, t in enumerate(stock_toks):
                top2 = stock_logits[i].topk(2).values
                if float(top2[0] - top2[1]) < 6 * e:
                    break  # the stock choice itself is rounding here; later tokens depend on it
                assert toks[b][i] == t, f"prompt {b} step {i}: got {toks[b][i]}, stock {t} (gap {float(top2[0]-top2[1]):.2e}, 6e={6*e:.2e})"
                compared += 1
    print(f"{kind} world {world}: compared {compared} of {total} tokens")
    assert compared >= 0.8 * total, f"only {compared} of {total} tokens were outside rounding ties"


@pytest.mark.distributed
@pytest.mark.parametrize("what", ["prompts", "do_sample", "max_new_tokens"])
def test_ranks_that_disagree_all_raise(gloo, what):
    from cpattn.testing.gloo import RankErrors

    with pytest.raises(RankErrors) as ei:
        gloo(2).run(H.cp_disagree, "qwen2", what, timeout=400)
    for o in ei.value.outcomes:
        assert not o.ok and o.error_type in ("CollectiveInputError", "UnsupportedModelError", "ValueError"), o.message
        assert "ContextParallelLM.generate" in o.message


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen2"])
def test_ranks_holding_no_prompt_row(gloo, kind):
    """Two 1-token prompts on 3 ranks: ranks 1 and 2 hold no prompt row (they run one padding
    token so the model code and the collectives still run), and the results are still exact."""
    import cpattn

    prompts = [[5], [7]]
    assert [cpattn.pcp_partition([0, 1, 2], 3, r).num_tokens for r in range(3)] == [2, 0, 0]
    res = gloo(3).run(H.cp_run, kind, 0, prompts, 3, 4, 1, "ring", timeout=400)
    toks, logits, pre, _ = res[0]
    assert all(r[0] == toks for r in res)
    m32, m64, _ = _stock(kind, _prompts(7, H.CONFIGS[kind]["vocab_size"]))
    with torch.no_grad():
        for b, p in enumerate(prompts):
            seq = torch.tensor([p + toks[b]])
            assert_close(pre[b], m64(torch.tensor([p])).logits[0], m32(torch.tensor([p])).logits[0],
                         dtype=torch.float32, what=f"prefill logits of prompt {b}")
            assert_close(logits[b], m64(seq).logits[0, :len(toks[b])], m32(seq).logits[0, :len(toks[b])],
                         dtype=torch.float32, what=f"decode logits of prompt {b}")


@pytest.mark.distributed
def test_ranks_with_different_weights_all_raise(gloo):
    from cpattn.testing.gloo import RankErrors

    with pytest.raises(RankErrors) as ei:
        gloo(2).run(H.cp_different_weights, "qwen2", timeout=400)
    for o in ei.value.outcomes:
        assert not o.ok and o.error_type == "CollectiveInputError" and "weights" in o.message, o.message
