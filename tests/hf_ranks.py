"""Small random-weight transformers models and the rank-side calls of the integration tests.

Module level so GlooWorld can pickle the functions by reference; every rank (and the test
process, for the stock model and the float64 reference) builds the same weights from a seed.
``initializer_range`` is large (0.2) so attention is far from uniform: a wrong position, a
missing key or a mis-ordered row changes the logits well beyond rounding.
"""
from __future__ import annotations

import torch

CONFIGS = {
    "qwen2": dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2),
    "llama": dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2),
    "deepseek_v3": dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                        n_routed_experts=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
                        qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        max_position_embeddings=256, initializer_range=0.2,
                        # YaRN: the softmax scale carries the mscale factor the integration must honour
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0,
                                             beta_fast=32.0, beta_slow=1.0)),
}


def build(kind: str, seed: int = 0, **overrides):
    """A fresh random-weight ``*ForCausalLM`` of ``kind`` in eval mode (float32)."""
    import transformers as T

    cls = {"qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM), "llama": (T.LlamaConfig, T.LlamaForCausalLM),
           "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM),
           "mistral": (T.MistralConfig, T.MistralForCausalLM)}[kind]
    cfg = cls[0](**{**CONFIGS.get(kind, CONFIGS["llama"]), **overrides})
    torch.manual_seed(seed)
    return cls[1](cfg).eval()


def built_on_every_rank() -> None:
    """Wait (up to 5 min) until every rank has imported transformers and built its model: the
    import alone takes seconds per process, and under load ranks can drift further apart than
    the process group's collective timeout (30 s in the tests)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=300))


def cp_run(kind: str, seed: int, prompts, max_new_tokens: int, block_size: int, interleave: int, method: str):
    """On every rank: ``(tokens, decode logits, prefill logits, attn_implementation after)``."""
    from cpattn.integrations.transformers import ContextParallelLM

    model = build(kind, seed)
    built_on_every_rank()
    lm = ContextParallelLM(model, None, block_size=block_size, interleave=interleave, pcp_method=method)
    toks, logits = lm.generate(prompts, max_new_tokens=max_new_tokens, eos_token_id=None, output_logits=True)
    pre = lm.prefill_logits(prompts)
    return toks, logits, pre, model.config._attn_implementation


def cp_disagree(kind: str, what: str):
    """Rank 1 asks for something else than rank 0 (``what``); every rank must raise, none hang."""
    from cpattn.integrations.transformers import ContextParallelLM
    from cpattn.testing import gloo as G

    model = build(kind, 0)
    built_on_every_rank()
    lm = ContextParallelLM(model, None, block_size=4)
    prompts, kw = [[1, 2, 3], [4]], {}
    if G.RANK == 1:
        if what == "prompts":
            prompts = [[1, 2, 3], [5]]
        elif what == "do_sample":
            kw = {"do_sample": True}
        elif what == "max_new_tokens":
            kw = {"max_new_tokens": 3}
    lm.generate(prompts, **{"max_new_tokens": 2, **kw})
    return "no error"


def cp_different_weights(kind: str):
    """Rank 1 builds its model from another seed: the constructor must refuse on every rank."""
    from cpattn.integrations.transformers import ContextParallelLM
    from cpattn.testing import gloo as G

    model = build(kind, 1 if G.RANK == 1 else 0)
    built_on_every_rank()
    ContextParallelLM(model, None)
    return "no error"
