"""What :class:`ContextParallelLM` can run, checked up front with errors that name the reason.

Supported: decoder-only causal LMs whose every layer is full (global) causal self-attention, with
the attention module of one of these families (class names checked, so a remote-code model that
reuses a ``model_type`` is not taken for the real one):

* GQA/MHA/MQA: Llama (``LlamaAttention``), Qwen2 (``Qwen2Attention``, without sliding window),
  Mistral (``MistralAttention``, with ``sliding_window=None``);
* MLA: DeepSeek-V3 (``DeepseekV3Attention``): latent cache ``[kv_lora_rank + qk_rope_head_dim]``.
"""
from __future__ import annotations

GQA = {"llama": "LlamaAttention", "qwen2": "Qwen2Attention", "mistral": "MistralAttention"}
MLA = {"deepseek_v3": "DeepseekV3Attention"}

# GenerationConfig fields whose logits processors act even in greedy decoding: a checkpoint that
# sets them would make stock greedy tokens differ from plain argmax, which is all this runs.
GREEDY_CHANGING = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                   "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
                   "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
                   "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "guidance_scale",
                   "watermarking_config")


class UnsupportedModelError(ValueError):
    """The model (or a generation option) is outside what ContextParallelLM runs exactly."""


def check_model(model) -> str:
    """``"gqa"`` or ``"mla"`` for a supported model; :class:`UnsupportedModelError` naming why not."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"ContextParallelLM: {type(model).__name__} is not a transformers *ForCausalLM model (needs .config, "
            f".model.layers and .lm_head)")
    mt = getattr(cfg, "model_type", None)
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError(f"ContextParallelLM: cross-attention (encoder-decoder model {mt!r}) is not "
                                    f"supported; only decoder-only self-attention models")
    if mt not in GQA and mt not in MLA:
        raise UnsupportedModelError(
            f"ContextParallelLM: model_type {mt!r} is not supported (its attention has not been verified); supported: "
            f"{sorted(GQA)} (GQA) and {sorted(MLA)} (MLA)")
    want = {**GQA, **MLA}[mt]
    for i, layer in enumerate(inner.layers):
        attn = getattr(layer, "self_attn", None)
        if type(attn).__name__ != want:
            raise UnsupportedModelError(
                f"ContextParallelLM: layer {i} attention is {type(attn).__name__}, not the {want} of model_type {mt!r} "
                f"(remote code or a modified model): unknown attention is not run")
        if getattr(attn, "sliding_window", None) is not None:
            raise UnsupportedModelError(f"ContextParallelLM: layer {i} uses sliding-window attention "
                                        f"(window {attn.sliding_window}); only full causal attention is supported")
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise UnsupportedModelError(f"ContextParallelLM: layer types {sorted(kinds)} are not supported; every layer must "
                                    f"be 'full_attention' (sliding-window and linear-attention layers are not)")
    if mt == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        raise UnsupportedModelError(
            f"ContextParallelLM: Mistral with sliding_window={cfg.sliding_window} is not supported (sliding-window "
            f"attention); only config.sliding_window=None")
    if mt == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise UnsupportedModelError("ContextParallelLM: Qwen2 with use_sliding_window=True is not supported "
                                    "(sliding-window attention)")
    if not getattr(cfg, "is_causal", True):
        raise UnsupportedModelError("ContextParallelLM: config.is_causal=False (bidirectional attention) is not supported")
    if mt in MLA:
        for i, layer in enumerate(inner.layers):
            if layer.self_attn.kv_b_proj.bias is not None:
                raise UnsupportedModelError(f"ContextParallelLM: layer {i} kv_b_proj has a bias; the absorbed MLA "
                                            f"decode needs a bias-free up-projection (as in DeepSeek-V2/V3)")
        return "mla"
    return "gqa"


def check_generation(model, options: dict) -> None:
    """Refuse anything but plain greedy decoding (options of the call, or the model's defaults)."""
    for k, v in options.items():
        if (k, v) in (("do_sample", False), ("num_beams", 1), ("num_return_sequences", 1)):
            continue
        raise UnsupportedModelError(f"ContextParallelLM.generate: option {k}={v!r} is not supported; only greedy "
                                    f"decoding (do_sample=False, num_beams=1) without logits processors")
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    from transformers import GenerationConfig

    default = GenerationConfig()
    for k in GREEDY_CHANGING:
        if getattr(gc, k, None) != getattr(default, k, None):
            raise UnsupportedModelError(
                f"ContextParallelLM.generate: model.generation_config.{k}={getattr(gc, k)!r} changes greedy tokens and is "
                f"not supported; set it to {getattr(default, k)!r} to run plain greedy decoding")
    if (getattr(gc, "num_beams", 1) or 1) > 1:
        raise UnsupportedModelError(f"ContextParallelLM.generate: model.generation_config.num_beams={gc.num_beams} "
                                    f"(beam search) is not supported; greedy only")
