"""Context-parallel greedy generation for Hugging Face transformers models (``cpattn[transformers]``).

```python
from cpattn.integrations.transformers import ContextParallelLM
lm = ContextParallelLM(model, group=None, block_size=16, interleave=1, pcp_method="ring")
new_tokens = lm.generate(prompts, max_new_tokens=16)   # list[list[int]] -> list[list[int]], greedy
logits = lm.prefill_logits(prompts)                    # list of [L_b, vocab] float tensors
```

Every rank of ``group`` holds the same weights and calls these collectively with the same
prompts; every rank returns the same results. Prefill: the prompts are packed and split with
:func:`cpattn.pcp_partition`; each rank runs the model on its rows at their global positions with
attention through :class:`cpattn.PcpPrefillPlan` (planned once per prefill, run once per layer).
The prefill K/V (MLA: latent rows) move to their
DCP owners with :func:`cpattn.pcp_to_dcp_handoff`. Decode: each new token is written on its owner
rank only; attention is :class:`cpattn.DcpDecodePlan` (planned once per step, run once per layer)
over the sharded paged cache; the
logits are identical on every rank, so the greedy choice needs no communication.

How it plugs in, what is supported and the cache layout: ``docs/integrations.md``;
the mechanics: :mod:`cpattn.integrations._hf_runtime`.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("cpattn.integrations.transformers needs Hugging Face transformers >= 5: "
                      "pip install 'cpattn[transformers]'") from exc

from .. import comm, layout
from ..handoff import pcp_to_dcp_handoff
from ..partition import pcp_partition, pcp_restore
from . import _hf_runtime as R
from ._hf_support import UnsupportedModelError, check_generation, check_model
from ._ops import DecodeAttention, PrefillAttention

__all__ = ["ContextParallelLM", "UnsupportedModelError"]

_FROM_CONFIG = object()


def _weights_checksum(model) -> tuple:
    """A cheap fingerprint of the weights: per parameter, float64 sums of its first and last 1024
    elements (catches ranks built from different seeds or checkpoints; not a full comparison)."""
    out = []
    try:
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            out.append((name, tuple(p.shape), float(flat[:1024].double().sum()), float(flat[-1024:].double().sum())))
    except Exception as exc:  # never let the fingerprint itself fail on one rank only
        return ("unavailable", type(exc).__name__)
    return tuple(out)


class ContextParallelLM:
    """Greedy generation and prefill logits of ``model`` over the context-parallel group ``group``.

    Args:
        model: a transformers 5.x ``*ForCausalLM`` of a supported family (Llama, Qwen2, Mistral
            without sliding window: GQA; DeepSeek-V3: MLA with a latent cache). Its weights must be
            the same on every rank. It is not modified: its ``attn_implementation`` is switched to
            ``"cpattn"`` only for the duration of each call, then restored.
        group: the CP process group (PCP prefill and DCP decode over the same ranks); None: the
            default group, or a single process when ``torch.distributed`` is not initialised.
        block_size: tokens per block of each rank's paged cache.
        interleave: DCP interleave (``cp_kv_cache_interleave_size``); divides ``block_size``.
        pcp_method: ``"ring"`` or ``"allgather"`` (see :func:`cpattn.pcp_ring_prefill`).
        backend: cpattn kernel backend for every op (None: automatic).

    Raises:
        :class:`UnsupportedModelError` (a ValueError) naming what is not supported: another model
        family or unknown attention module, sliding-window or non-full layers, cross-attention,
        a bias on MLA's ``kv_b_proj``. TypeError/ValueError for bad arguments.
    """

    def __init__(self, model, group=None, *, block_size: int = 16, interleave: int = 1, pcp_method: str = "ring",
                 backend: str | None = None):
        if group is not None and not comm.is_process_group(group):
            raise TypeError(f"ContextParallelLM: group must be a torch.distributed ProcessGroup or None; got "
                            f"{type(group).__name__}")
        self.world, self.rank = comm.world_size(group), comm.rank(group)
        err, self.kind, self.scale = None, None, None
        try:  # refused on every rank together (the agreement below): never one rank alone
            self.kind = check_model(model)
            layout.check_layout(self.world, interleave, block_size, self.rank)
            if pcp_method not in ("ring", "allgather"):
                raise ValueError(f"ContextParallelLM: pcp_method must be 'ring' or 'allgather'; got {pcp_method!r}")
            if backend is not None and not isinstance(backend, str):
                raise TypeError(f"ContextParallelLM: backend must be a str or None; got {type(backend).__name__}")
            scales = {float(layer.self_attn.scaling) for layer in model.model.layers}
            if len(scales) != 1:
                raise UnsupportedModelError(f"ContextParallelLM: layers with different softmax scales {sorted(scales)} "
                                            f"are not supported")
            self.scale = scales.pop()
        except (TypeError, ValueError) as exc:
            err = exc
        cfg = getattr(model, "config", None)
        comm.agree("ContextParallelLM", err, {
            "block_size": repr(block_size), "interleave": repr(interleave), "pcp_method": repr(pcp_method),
            "backend": repr(backend), "attention kind": self.kind, "softmax scale": self.scale,
            "model config": repr(cfg.to_dict() if hasattr(cfg, "to_dict") else None),
            "weights (sampled checksum)": _weights_checksum(model)}, group)
        self.model, self.group = model, group
        self.block_size, self.interleave, self.pcp_method, self.backend = block_size, interleave, pcp_method, backend
        self.num_layers = len(model.model.layers)
        self.vocab_size = model.config.vocab_size
        self.last_times: dict = {}  # seconds of the last generate: {"prefill": s, "decode": [s per step]}
        R.register()
        # collective (every rank constructs it): the PCP plan, planned once per prefill
        self._prefill_attn = PrefillAttention(group, method=pcp_method, scale=self.scale, backend=backend,
                                              device=model.device)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Logits of every prompt position: a list of ``[L_b, vocab]`` tensors (the model's dtype,
        on its device), the same on every rank. Collective over ``group``."""
        prompts = self._agree_prompts("prefill_logits", prompts, {})
        cu, part, logits, _ = self._prefill(prompts, capacity=None, keep="all")
        full = self._gather_rows(logits, cu)
        return [full[a:b] for a, b in zip(cu, cu[1:])]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16, *, eos_token_id=_FROM_CONFIG,
                 output_logits: bool = False, **options):
        """Greedy continuation of every prompt: ``list[list[int]]``, up to ``max_new_tokens`` new
        tokens each, the same on every rank. A request stops after its first token in
        ``eos_token_id`` (default: ``model.generation_config.eos_token_id``; None: never), which
        is included, as in ``model.generate``. With ``output_logits``, also returns per request
        the ``[n_new, vocab]`` logits that chose each token. ``options``: only ``do_sample=False``,
        ``num_beams=1``, ``num_return_sequences=1`` (anything else raises
        :class:`UnsupportedModelError`, as does a ``generation_config`` with processors that act in
        greedy mode, e.g. ``repetition_penalty``). Collective over ``group``."""
        import time

        err, eos = None, set()
        try:  # refused on every rank together (the agreement below), never on one rank alone
            check_generation(self.model, options)
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
                raise ValueError(f"ContextParallelLM.generate: max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
            eos = self._eos(eos_token_id)
        except (TypeError, ValueError) as exc:
            err = exc
        prompts = self._agree_prompts("generate", prompts, {"max_new_tokens": repr(max_new_tokens), "eos": sorted(eos),
                                                            "options": repr(sorted(options.items()))}, err)
        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        outl: list[list[torch.Tensor]] = [[] for _ in range(B)]
        if max_new_tokens == 0 or B == 0:
            return (out, [torch.zeros(0, self.vocab_size) for _ in range(B)]) if output_logits else out
        t0 = time.perf_counter()
        cu, part, last, store = self._prefill(prompts, capacity=max_new_tokens, keep="last")
        logits = self._gather_last(last, cu, part)  # [B, V]
        dec = self._decode_attention(store, B)
        self.last_times = {"prefill": time.perf_counter() - t0, "decode": []}
        lens = [len(p) for p in prompts]
        done = [False] * B
        for _ in range(max_new_tokens):
            tok = logits.argmax(dim=-1).tolist()
            active = [b for b in range(B) if not done[b]]
            for j, b in enumerate(active):
                out[b].append(tok[j])
                if output_logits:
                    outl[b].append(logits[j].float().cpu())
                if tok[j] in eos or len(out[b]) == max_new_tokens:
                    done[b] = True
            nxt = [(b, out[b][-1]) for b in active if not done[b]]
            if not nxt:
                break
            t1 = time.perf_counter()
            logits = self._decode(nxt, lens, out, store, dec)
            self.last_times["decode"].append(time.perf_counter() - t1)
        if output_logits:
            return out, [torch.stack(x) if x else torch.zeros(0, self.vocab_size) for x in outl]
        return out

    # ------------------------------------------------------------------ internals
    def _eos(self, eos_token_id) -> set[int]:
        if eos_token_id is _FROM_CONFIG:
            gc = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(gc, "eos_token_id", None)
        if eos_token_id is None:
            return set()
        vals = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            raise TypeError(f"ContextParallelLM.generate: eos_token_id must be an int, a list of ints or None; "
                            f"got {eos_token_id!r}")
        return set(vals)

    def _agree_prompts(self, op: str, prompts, extra: dict, err: Exception | None = None) -> list[list[int]]:
        """Validate the prompts and make every rank agree on them (and on ``extra``); an ``err``
        found earlier, or a bad prompt on any rank, raises on every rank."""
        vals = None
        try:
            if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)):
                raise TypeError(f"ContextParallelLM.{op}: prompts must be a list of token-id lists; got "
                                f"{type(prompts).__name__}")
            vals = []
            for i, p in enumerate(prompts):
                p = p.tolist() if isinstance(p, torch.Tensor) and p.dim() == 1 else p
                if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                    raise TypeError(f"ContextParallelLM.{op}: prompts[{i}] must be a list of ints (or a 1-D tensor)")
                if len(p) == 0:
                    raise ValueError(f"ContextParallelLM.{op}: prompts[{i}] is empty; every prompt needs >= 1 token")
                if min(p) < 0 or max(p) >= self.vocab_size:
                    raise ValueError(f"ContextParallelLM.{op}: prompts[{i}] has token ids outside [0, {self.vocab_size})")
                vals.append(list(p))
        except (TypeError, ValueError) as exc:
            err = err or exc
        fields = {"prompts": None if vals is None else tuple(map(tuple, vals)), **extra}
        comm.agree(f"ContextParallelLM.{op}", err, fields, self.group)
        return vals

    @contextlib.contextmanager
    def _cpattn_attention(self):
        old = self.model.config._attn_implementation
        self.model.set_attn_implementation(R.NAME)
        try:
            yield
        finally:
            self.model.set_attn_implementation(old)

    def _forward(self, step: R.Step, ids: torch.Tensor, pos: torch.Tensor, keep):
        dev = self.model.device
        cache = R.make_cache(step, self.num_layers)
        with self._cpattn_attention():
            out = self.model(input_ids=ids[None].to(dev), position_ids=pos[None].to(dev), cache=cache, use_cache=True,
                             cpattn_step=step, logits_to_keep=keep)
        return out.logits[0]

    def _prefill(self, prompts, capacity: int | None, keep: str):
        lens = [len(p) for p in prompts]
        cu = [0]
        for L in lens:
            cu.append(cu[-1] + L)
        part = pcp_partition(cu, self.world, self.rank)
        n = part.num_tokens
        packed = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)
        ids, pos = packed[part.index], part.positions
        if n == 0:  # padding row: the model cannot run zero tokens, the collectives need this rank
            ids, pos = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        pre = self._prefill_attn
        pre.plan(torch.tensor(cu, dtype=torch.int64))
        step = R.Step("prefill", self.kind, n, prefill=pre)
        if keep == "all":
            logits = self._forward(step, ids, pos, 0)[:n]
        else:  # only the rows that are a prompt's last token
            last = {c - 1 for c in cu[1:]}
            rows_ = torch.tensor([i for i, g in enumerate(part.index.tolist()) if g in last], dtype=torch.int64)
            logits = self._forward(step, ids, pos, rows_.to(self.model.device))
        store = None
        if capacity is not None:
            store = self._allocate(step, lens, capacity)
            flat_rows = [t for idx in range(self.num_layers) for t in step.stash[idx]]
            caches = [c for idx in range(self.num_layers) for c in self._layer_caches(store, idx)]
            pcp_to_dcp_handoff(flat_rows, cu, caches, store.block_table, group=self.group, interleave=self.interleave)
        return cu, part, logits, store

    def _layer_caches(self, store: R.PagedStore, idx: int):
        return [store.k[idx]] + ([store.v[idx]] if store.v is not None else [])

    def _allocate(self, step: R.Step, lens, capacity: int) -> R.PagedStore:
        cap = torch.tensor(lens, dtype=torch.int64) + capacity
        table, nblk = layout.allocate_block_table(cap, world_size=self.world, rank=self.rank,
                                                  block_size=self.block_size, interleave=self.interleave)
        dev = self.model.device
        proto = step.stash[0]

        def alloc(t):
            return torch.zeros(max(nblk, 1), self.block_size, *t.shape[1:], dtype=t.dtype, device=dev)

        k = [alloc(proto[0]) for _ in range(self.num_layers)]
        v = [alloc(proto[1]) for _ in range(self.num_layers)] if self.kind == "gqa" else None
        return R.PagedStore(k, v, table.to(dev), self.block_size, self.interleave)

    def _decode_attention(self, store: R.PagedStore, num_seqs: int) -> DecodeAttention:
        """The DCP plan of one generate (collective: every rank builds it), sized by its batch."""
        k = store.k[0]
        if self.kind == "gqa":
            hkv, d, dv, mla = k.shape[2], k.shape[3], store.v[0].shape[3], False
        else:  # latent rows [kv_lora_rank + rope]; V = the first kv_lora_rank channels
            hkv, d, dv, mla = 1, k.shape[3], self.model.model.layers[0].self_attn.kv_lora_rank, True
        return DecodeAttention(self.group, num_heads=self.model.config.num_attention_heads, num_kv_heads=hkv,
                               head_dim=d, v_head_dim=dv, mla=mla, block_size=self.block_size,
                               interleave=self.interleave, scale=self.scale, max_num_seqs=num_seqs,
                               max_blocks_per_seq=store.block_table.shape[1], dtype=k.dtype, device=k.device,
                               backend=self.backend)

    def _decode(self, nxt, lens, out, store: R.PagedStore, dec: DecodeAttention) -> torch.Tensor:
        """One decode step for the requests in ``nxt`` (``(request, token)``): logits ``[A, V]``."""
        reqs = torch.tensor([b for b, _ in nxt], dtype=torch.int64)
        ids = torch.tensor([t for _, t in nxt], dtype=torch.int64)
        pos = torch.tensor([lens[b] + len(out[b]) - 1 for b, _ in nxt], dtype=torch.int64)  # the new token's position
        dev = self.model.device
        dec.plan((pos + 1).to(torch.int32).to(dev), store.block_table[reqs.to(dev)])
        slots = R.decode_slots(pos.to(dev), reqs.to(dev), store, self.world, self.rank)
        step = R.Step("decode", self.kind, len(nxt), decode=dec, store=store, slots=slots)
        return self._forward(step, ids, pos, 0)

    def _gather_rows(self, rows: torch.Tensor, cu) -> torch.Tensor:
        """Every rank's ``[Tr, V]`` rows -> ``[T, V]`` in global order, on every rank."""
        parts = [pcp_partition(cu, self.world, s) for s in range(self.world)]
        tmax = max(p.num_tokens for p in parts)
        buf = rows.new_zeros(tmax, *rows.shape[1:])
        buf[: rows.shape[0]] = rows
        g = comm.all_gather(buf.contiguous(), self.group)
        return pcp_restore([g[s, : parts[s].num_tokens] for s in range(self.world)], cu)

    def _gather_last(self, last: torch.Tensor, cu, part) -> torch.Tensor:
        """The last-token logits of every prompt ``[B, V]``: each lives on one rank."""
        B = len(cu) - 1
        mine = torch.zeros(B, *last.shape[1:], dtype=last.dtype, device=last.device)
        have = torch.zeros(B, dtype=torch.int64, device=last.device)
        ends = {c - 1: b for b, c in enumerate(cu[1:])}
        j = 0
        for g in part.index.tolist():
            if g in ends:
                mine[ends[g]] = last[j]
                have[ends[g]] = 1
                j += 1
        g_l = comm.all_gather(mine, self.group)  # [N, B, V]
        g_h = comm.all_gather(have, self.group)  # [N, B]
        owner = g_h.argmax(dim=0)  # exactly one rank holds each prompt's last token
        return g_l[owner, torch.arange(B, device=last.device)]
