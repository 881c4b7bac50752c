"""``cpattn-bench e2e``: a real transformers model generating with PCP prefill + DCP decode.

Builds a small random-weight model of a supported family from its config (no download), runs
greedy generation through :class:`cpattn.integrations.transformers.ContextParallelLM` on gloo
ranks (once on 1 rank, once on N, in one world: the 1-rank run uses a group of rank 0 alone),
and prints the tokens, whether they equal the unmodified model's ``generate(do_sample=False)``
prompt by prompt, and the prefill time and decode time per step (rank 0's wall time, 1 thread per
rank). Needs the ``cpattn[transformers]`` extra. CPU/gloo timings of tiny models show the
mechanics (what is communicated, when), not serving speed.
"""
from __future__ import annotations

import statistics
import time

import torch

from .common import print_table

MODELS = ("qwen2", "deepseek_v3", "llama")


def _config(kind: str, layers: int, hidden: int, vocab: int):
    import transformers as T

    heads = max(2, hidden // 16)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=4096, initializer_range=0.2)
    if kind == "qwen2":
        return T.Qwen2Config(num_key_value_heads=max(1, heads // 2), **common), T.Qwen2ForCausalLM
    if kind == "llama":
        return T.LlamaConfig(num_key_value_heads=max(1, heads // 2), **common), T.LlamaForCausalLM
    return (T.DeepseekV3Config(num_key_value_heads=heads, moe_intermediate_size=hidden // 2, n_shared_experts=1,
                               n_routed_experts=4, kv_lora_rank=hidden // 2, q_lora_rank=hidden // 2,
                               qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1,
                               num_experts_per_tok=2, first_k_dense_replace=1, **common),
            T.DeepseekV3ForCausalLM)


def build(kind: str, layers: int, hidden: int, vocab: int, seed: int = 0):
    cfg, cls = _config(kind, layers, hidden, vocab)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def _rank_generate(spec: dict, prompts, new: int, bs: int, il: int, method: str) -> dict:
    """On every rank: generation on rank 0 alone (a 1-rank group), then on all ranks."""
    import torch.distributed as dist

    from cpattn.integrations.transformers import ContextParallelLM

    import datetime

    model = build(**spec)
    # every rank has imported transformers and built the model (seconds each, and they can drift
    # apart by more than a short process-group timeout under load)
    if dist.get_world_size() > 1:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=300))
    solo = dist.new_group([0])
    res = {}
    for name, group in (("1 rank", solo), (f"{dist.get_world_size()} ranks", None)):
        if group is solo and dist.get_rank() != 0:
            continue
        lm = ContextParallelLM(model, group, block_size=bs, interleave=il, pcp_method=method)
        lm.generate(prompts, max_new_tokens=2, eos_token_id=None)  # warm-up
        t0 = time.perf_counter()
        toks = lm.generate(prompts, max_new_tokens=new, eos_token_id=None)
        total = time.perf_counter() - t0
        res[name] = {"tokens": toks, "prefill_s": lm.last_times["prefill"],
                     "decode_s": statistics.median(lm.last_times["decode"]) if lm.last_times["decode"] else 0.0,
                     "total_s": total}
    dist.destroy_process_group(solo)
    return res


def bench(kind: str, world: int, lens, new: int, bs: int, il: int, method: str, layers: int, hidden: int,
          vocab: int, show: int = 8, gloo_world=None) -> bool:
    """Print the run; True when every prompt's tokens equal the stock model's. ``gloo_world``: an
    open :class:`cpattn.testing.gloo.GlooWorld` of ``world`` ranks to reuse (tests)."""
    from cpattn.testing.gloo import GlooWorld

    spec = dict(kind=kind, layers=layers, hidden=hidden, vocab=vocab)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    model = build(**spec)
    stock = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            stock.append(out[0, len(p):].tolist())
    if gloo_world is not None:
        res = gloo_world.run(_rank_generate, spec, prompts, new, bs, il, method, timeout=300)[0]
    else:
        with GlooWorld(world, timeout=600, threads=1) as w:
            res = w.run(_rank_generate, spec, prompts, new, bs, il, method)[0]
    ok = True
    print(f"\n== e2e: {kind} ({layers} layers, hidden {hidden}, random weights), prompts of {list(lens)} tokens, "
          f"{new} new tokens, block {bs}, interleave {il}, PCP {method}")
    for b, p in enumerate(prompts):
        got = {k: v["tokens"][b] for k, v in res.items()}
        same = all(t == stock[b] for t in got.values())
        ok &= same
        print(f"prompt {b} (len {len(p)}): stock {stock[b][:show]}  cpattn {list(got.values())[-1][:show]}  "
              f"{'match' if same else 'MISMATCH ' + str(got)}")
    rows = [{"ranks": k, "prefill_ms": v["prefill_s"] * 1e3, "decode_ms_per_step": v["decode_s"] * 1e3,
             "generate_ms": v["total_s"] * 1e3} for k, v in res.items()]
    print_table(rows, ["ranks", "prefill_ms", "decode_ms_per_step", "generate_ms"],
                "time on rank 0 (CPU, gloo, 1 thread per rank; tiny model: mechanics, not speed)")
    print("tokens equal to model.generate(do_sample=False), prompt by prompt:", "yes" if ok else "NO")
    return ok


def register(subs) -> None:
    p = subs.add_parser("e2e", help="a transformers model generating with PCP prefill + DCP decode on gloo ranks")
    p.add_argument("--model", default="qwen2", choices=MODELS)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--prompt-lens", default="37,5,1,120", help="comma list of prompt lengths (one batch)")
    p.add_argument("--new", type=int, default=8, help="new tokens per prompt")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--interleave", type=int, default=1)
    p.add_argument("--method", default="ring", choices=["ring", "allgather"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("cpattn-bench e2e needs the transformers extra: pip install 'cpattn[transformers]'")
        return 1
    ok = bench(args.model, args.world, [int(x) for x in args.prompt_lens.split(",")], args.new, args.block_size,
               args.interleave, args.method, args.layers, args.hidden, args.vocab)
    return 0 if ok else 1


def tour() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("\n== e2e: skipped (install the cpattn[transformers] extra to run a real model)")
        return True
    return bench("deepseek_v3", 2, [37, 5, 1], 4, 16, 1, "ring", 2, 64, 256)
