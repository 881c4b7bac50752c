"""ContextParallelLM refuses what it cannot run exactly, with errors that name the reason, and
leaves the model as it was (single process: no ranks needed)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_cpattn_without_transformers():
    """The core imports and runs with transformers unimportable; the integration says which extra."""
    code = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
import torch, cpattn, cpattn.integrations
q = torch.randn(2, 2, 8); o = torch.randn(2, 2, 8); l = torch.randn(2, 2)
cpattn.merge_attn_states(o, l, o, l)
assert "transformers" not in sys.modules
try:
    import cpattn.integrations.transformers
except ImportError as e:
    assert "cpattn[transformers]" in str(e), str(e)
    print("OK")
"""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]


pytest.importorskip("transformers", reason="needs the cpattn[transformers] extra")

import hf_ranks as H  # noqa: E402
from cpattn.integrations.transformers import ContextParallelLM, UnsupportedModelError  # noqa: E402


@pytest.fixture(scope="module")
def qwen():
    return H.build("qwen2")


@pytest.mark.parametrize("kind,overrides,match", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), "sliding"),
    ("mistral", dict(sliding_window=16), "sliding"),
])
def test_sliding_window_refused(kind, overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ContextParallelLM(H.build(kind, **overrides))


def test_mistral_without_sliding_window_runs():
    m = H.build("mistral", sliding_window=None)
    lm = ContextParallelLM(m, block_size=4)
    got = lm.generate([[1, 2, 3]], max_new_tokens=3, eos_token_id=None)
    ids = torch.tensor([[1, 2, 3]])
    want = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == [want[0, 3:].tolist()]


def test_unknown_model_type_refused():
    import transformers as T

    cfg = T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    with pytest.raises(UnsupportedModelError, match="not a transformers|not supported"):
        ContextParallelLM(T.GPT2LMHeadModel(cfg))


def test_unknown_attention_module_refused(qwen):
    import copy

    m = copy.deepcopy(qwen)

    class MyAttention(torch.nn.Module):
        pass

    m.model.layers[1].self_attn = MyAttention()
    with pytest.raises(UnsupportedModelError, match="MyAttention"):
        ContextParallelLM(m)


def test_cross_attention_refused(qwen):
    import copy

    m = copy.deepcopy(qwen)
    m.config.is_encoder_decoder = True
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        ContextParallelLM(m)


@pytest.mark.parametrize("opts", [dict(do_sample=True), dict(num_beams=2), dict(temperature=0.7), dict(top_k=5)])
def test_non_greedy_options_refused(qwen, opts):
    lm = ContextParallelLM(qwen)
    with pytest.raises(UnsupportedModelError, match=next(iter(opts))):
        lm.generate([[1, 2]], max_new_tokens=2, **opts)


def test_greedy_changing_generation_config_refused(qwen):
    import copy

    m = copy.deepcopy(qwen)
    m.generation_config.repetition_penalty = 1.3
    with pytest.raises(UnsupportedModelError, match="repetition_penalty"):
        ContextParallelLM(m).generate([[1, 2]], max_new_tokens=2)


@pytest.mark.parametrize("prompts,match", [([[]], "empty"), ([[1, 10_000]], "outside"), ("abc", "list"),
                                           ([[1.5]], "list of ints")])
def test_bad_prompts(qwen, prompts, match):
    lm = ContextParallelLM(qwen)
    with pytest.raises((TypeError, ValueError), match=match):
        lm.generate(prompts, max_new_tokens=1)


@pytest.mark.parametrize("kw,match", [(dict(interleave=3, block_size=4), "multiple of interleave"),
                                      (dict(pcp_method="zigzag"), "pcp_method"), (dict(group="g"), "ProcessGroup")])
def test_bad_arguments(qwen, kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ContextParallelLM(qwen, **kw)


def test_attention_function_outside_wrapper_refuses(qwen):
    import copy

    from cpattn.integrations import _hf_runtime as R

    R.register()
    m = copy.deepcopy(qwen)
    m.set_attn_implementation(R.NAME)
    with pytest.raises(RuntimeError, match="only runs inside"):
        m(torch.tensor([[1, 2, 3]]))


def test_model_left_as_it_was(qwen):
    lm = ContextParallelLM(qwen, block_size=4)
    before = {k: v.clone() for k, v in qwen.state_dict().items()}
    impl = qwen.config._attn_implementation
    lm.generate([[1, 2, 3], [4]], max_new_tokens=2)
    with pytest.raises(UnsupportedModelError):
        lm.generate([[1]], max_new_tokens=2, do_sample=True)
    assert qwen.config._attn_implementation == impl
    assert all(torch.equal(v, qwen.state_dict()[k]) for k, v in before.items())
    # the stock model still runs its own attention
    qwen(torch.tensor([[1, 2, 3]]))


def test_eos_stops_a_request_like_stock_generate(qwen):
    lm = ContextParallelLM(qwen, block_size=4)
    free = lm.generate([[5, 6, 7]], max_new_tokens=6, eos_token_id=None)[0]
    eos = free[2]
    got = lm.generate([[5, 6, 7], [5, 6]], max_new_tokens=6, eos_token_id=eos)
    assert got[0] == free[:free.index(eos) + 1]
    ids = torch.tensor([[5, 6]])
    want = qwen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert got[1] == want[0, 2:].tolist()


def test_plan_once_per_step_run_once_per_layer(qwen):
    """The integration plans each prefill / decode step once and runs once per layer."""
    from unittest import mock

    import cpattn

    calls = {"pcp.plan": 0, "pcp.run": 0, "dcp.init": 0, "dcp.plan": 0, "dcp.run": 0}

    def count(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    with mock.patch.object(cpattn.PcpPrefillPlan, "plan", count("pcp.plan", cpattn.PcpPrefillPlan.plan)), \
            mock.patch.object(cpattn.PcpPrefillPlan, "run", count("pcp.run", cpattn.PcpPrefillPlan.run)), \
            mock.patch.object(cpattn.DcpDecodePlan, "__init__", count("dcp.init", cpattn.DcpDecodePlan.__init__)), \
            mock.patch.object(cpattn.DcpDecodePlan, "plan", count("dcp.plan", cpattn.DcpDecodePlan.plan)), \
            mock.patch.object(cpattn.DcpDecodePlan, "run", count("dcp.run", cpattn.DcpDecodePlan.run)):
        lm = ContextParallelLM(qwen, block_size=4)
        lm.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, eos_token_id=None)
    layers = qwen.config.num_hidden_layers
    assert calls == {"pcp.plan": 1, "pcp.run": layers, "dcp.init": 1, "dcp.plan": 3, "dcp.run": 3 * layers}, calls
