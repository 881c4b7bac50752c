"""How cpattn runs inside an unmodified transformers model: one registered attention function and
one Cache object, both public extension points of transformers 5.x.

The model's own forward runs (embeddings, rope at the positions we pass, norms, MLP/MoE, lm_head);
two calls from its attention modules reach us:

* ``cache.update(key, value, layer_idx)`` -> :class:`CpCache`: in a prefill it keeps this rank's
  rows for the PCP -> DCP hand-off (GQA: K and V after rope; MLA: the latent row
  ``[kv_lora_rank | k_rope]`` that DeepSeek-V3 hands its cache); in a decode step it writes the new
  tokens into this rank's paged cache at their DCP slots (owner rank only). It returns its inputs.
* the attention function ``"cpattn"`` (registered in ``AttentionInterface``), reached because the
  wrapper switches ``attn_implementation`` for the duration of its calls and passes the step
  state as the ``cpattn_step`` keyword (transformers forwards unknown keywords down to it).
  Prefill: PCP attention of this rank's rows (``PcpPrefillPlan.run``, planned once per prefill).
  Decode: GQA -> DCP decode attention over the paged K/V (``DcpDecodePlan.run``, planned once per
  step); MLA -> its MLA path over the latent cache, with the key up-projection absorbed into the query and the value up-projection
  applied to the latent output (the expanded K/V the module computes for the new tokens are
  ignored).

Tokens travel as one packed row ``[1, T]`` (prefill: this rank's PCP rows; decode: one token per
active request) with explicit ``position_ids``; no attention mask is built (the custom function
has no mask interface, so transformers skips it). Rows past ``step.num_real`` are padding (a
rank that holds no prompt row still runs the model on one dummy token: collectives need every
rank, and model code cannot reshape zero-token tensors); they never reach cpattn's ops.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .. import layout

NAME = "cpattn"


@dataclass
class PagedStore:
    """This rank's shard of the DCP-layout paged cache, for every layer.

    GQA: ``k[l] [num_blocks, block_size, Hkv, D]``, ``v[l] [num_blocks, block_size, Hkv, Dv]``.
    MLA: ``k[l] [num_blocks, block_size, 1, kv_lora_rank + rope_dim]`` (the latent row), ``v`` None.
    ``block_table [B, width]`` int32 (one table for every layer), from
    :func:`cpattn.layout.allocate_block_table`.
    """

    k: list
    v: list | None
    block_table: torch.Tensor
    block_size: int
    interleave: int


@dataclass
class Step:
    """State of one model call (one prefill or one decode step), passed as ``cpattn_step``."""

    mode: str  # "prefill" or "decode"
    kind: str  # "gqa" or "mla"
    num_real: int  # real rows of the packed input (the rest is padding)
    prefill: object = None  # _ops.PrefillAttention, planned for this batch
    decode: object = None  # _ops.DecodeAttention, planned for this step
    store: PagedStore | None = None
    slots: torch.Tensor | None = None  # decode: this rank's flat slot of each new token, -1 elsewhere
    stash: dict = field(default_factory=dict)  # prefill: layer -> list of row tensors for the hand-off


def rows(x: torch.Tensor) -> torch.Tensor:
    """``[1, H, T, D]`` (transformers' layout) -> ``[T, H, D]``."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise RuntimeError(f"cpattn attention: expected [1, heads, tokens, dim] tensors (one packed row); got "
                           f"{tuple(x.shape)}")
    return x[0].transpose(0, 1)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"cpattn"`` attention function (transformers' AttentionInterface signature)."""
    step: Step | None = kwargs.get("cpattn_step")
    if step is None:
        raise RuntimeError("attn_implementation 'cpattn' only runs inside cpattn.integrations.transformers."
                           "ContextParallelLM (it needs the step state of its paged, sharded cache)")
    if kwargs.get("sliding_window") is not None:
        raise RuntimeError(f"cpattn attention: sliding_window={kwargs['sliding_window']} is not supported")
    if dropout and module.training:
        raise RuntimeError("cpattn attention: attention dropout in training mode is not supported; call model.eval()")
    if attention_mask is not None:
        raise RuntimeError("cpattn attention: got an attention mask; ContextParallelLM runs packed rows without masks")
    q = rows(query)
    T, n = q.shape[0], step.num_real
    if step.mode == "prefill":
        out = step.prefill.run(q[:n].contiguous(), rows(key)[:n].contiguous(), rows(value)[:n].contiguous(), scaling)
    elif step.kind == "gqa":
        out = step.decode.run(q[:n].contiguous(), step.store.k[module.layer_idx], step.store.v[module.layer_idx],
                              scaling)
    else:
        out = _mla_decode(module, q[:n], step, scaling)
    if n < T:
        out = torch.cat([out, out.new_zeros(T - n, *out.shape[1:])])
    return out.unsqueeze(0), None


def _mla_decode(module, q: torch.Tensor, step: Step, scaling: float) -> torch.Tensor:
    """Absorbed MLA decode: ``q [T, H, nope + rope]`` -> ``out [T, H, v_head_dim]``.

    ``kv_b_proj.weight [H * (nope + v), r]`` holds per head ``W_uk [nope, r]`` and ``W_uv [v, r]``:
    ``k_nope_h = W_uk c`` and ``v_h = W_uv c`` for a latent ``c``. So ``q_nope . k_nope_h =
    (W_uk^T q_nope) . c`` and ``sum_j p_j v_j = W_uv (sum_j p_j c_j)``: attention runs on the latent
    rows ``[c | k_rope]`` (one KV head, V = the first ``r`` channels) with query
    ``[W_uk^T q_nope | q_rope]``, and ``W_uv`` maps the latent output back. Same scale as the model.
    """
    nope, dv, r = module.qk_nope_head_dim, module.v_head_dim, module.kv_lora_rank
    H = q.shape[1]
    w = module.kv_b_proj.weight.view(H, nope + dv, r)
    q_lat = torch.einsum("thn,hnr->thr", q[..., :nope], w[:, :nope])
    q_mla = torch.cat([q_lat, q[..., nope:]], dim=-1).contiguous()
    o_lat = step.decode.run(q_mla, step.store.k[module.layer_idx], None, scaling)
    return torch.einsum("thr,hvr->thv", o_lat, w[:, nope:])


@functools.lru_cache(maxsize=None)
def _make_layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class CpLayer(CacheLayerMixin):
        """One layer of :class:`CpCache`: hands the new rows to the step (see the module docstring)."""

        def __init__(self, owner, idx: int):
            super().__init__()
            self.owner, self.idx = owner, idx
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states):  # storage is the PagedStore
            return None

        def update(self, key_states, value_states, *args, **kwargs):
            self.owner.absorb(self.idx, key_states, value_states)
            return key_states, value_states

        def _no_length(self, *args, **kwargs):
            raise RuntimeError("the cpattn cache is paged and sharded over ranks: it has no single sequence length; "
                               "ContextParallelLM always passes position_ids")

        get_mask_sizes = get_seq_length = get_max_length = _no_length

    return CpLayer


def make_cache(step: Step, num_layers: int):
    """A transformers ``Cache`` whose ``update`` feeds ``step`` (see the module docstring)."""
    return _make_cache_class()(step, num_layers)


@functools.lru_cache(maxsize=None)
def _make_cache_class():
    from transformers.cache_utils import Cache

    layer_cls = _make_layer_class()

    class CpCache(Cache):
        def __init__(self, step: Step, num_layers: int):
            self.step = step
            super().__init__(layers=[layer_cls(self, i) for i in range(num_layers)])

        def absorb(self, idx: int, key_states, value_states) -> None:
            step = self.step
            n = step.num_real
            if step.kind == "gqa":
                new = [rows(key_states)[:n], rows(value_states)[:n]]
            else:  # DeepSeek-V3 caches (kv_a_layernorm(latent), k_rope after rope), both [1, 1, T, .]
                new = [torch.cat([rows(key_states)[:n], rows(value_states)[:n]], dim=-1)]
            if step.mode == "prefill":
                step.stash[idx] = new
                return
            store, slots = step.store, step.slots
            mine = slots >= 0
            dst = slots[mine]
            caches = [store.k[idx]] + ([store.v[idx]] if step.kind == "gqa" else [])
            for cache, src in zip(caches, new):
                cache.view(-1, *cache.shape[2:])[dst] = src[mine.to(src.device)].to(cache.dtype)

    return CpCache


def decode_slots(positions: torch.Tensor, requests: torch.Tensor, store: PagedStore, world: int, rank: int):
    """This rank's flat cache slot of each new token (``-1`` where another rank owns it)."""
    return layout.slot_mapping(positions, requests, store.block_table, store.block_size, world_size=world, rank=rank,
                               interleave=store.interleave)


def register() -> None:
    """Register the ``"cpattn"`` attention function with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
