"""cpattn: context-parallel attention kernels.

Public ops (also registered as ``torch.ops.cpattn.<name>``):

* :func:`merge_attn_states`, :func:`merge_attn_states_n`: exact merges of partial results.
* :func:`dcp_decode_attention`: decode attention over a KV cache sharded across ranks (DCP);
  :mod:`cpattn.layout` (who owns which token), :mod:`cpattn.config` (deployment checks).
* :func:`pcp_ring_prefill`: prefill attention of a prompt spread over ranks (PCP), with
  :func:`pcp_partition` (head-tail token layout) and :func:`pcp_restore` (back to global order).
* Serving (plan once per step, run once per layer, no host sync in ``run``; docs/serving.md):
  :class:`DcpDecodePlan` and :class:`PcpPrefillPlan`; the one-call ops are these, planned and run once.
* :func:`pcp_to_dcp_handoff`: move a PCP prefill's K/V rows into the DCP-layout paged cache.
* :mod:`cpattn.integrations.transformers` (extra ``cpattn[transformers]``, imported on demand):
  ``ContextParallelLM``, PCP prefill + DCP decode for Hugging Face models.

LSE contract (:mod:`cpattn.lse`): float32, natural log, shaped like ``out`` without its last
dim; ``(0, -inf)`` is the empty state; ``+inf``/NaN input LSEs are treated as empty. A row that
sees a NaN or inf (in its query, or a key or value it sees) comes out NaN, ``out`` and ``lse``
(docs/reliability.md).

Forward only: no op has a backward (autograd formula). The eager merges refuse inputs that
require grad while grad mode is on; a backward through a ``torch.ops.cpattn`` op raises. Inference
(serving) only, until backward kernels exist.
"""
from . import _library  # noqa: F401  (registers torch.ops.cpattn.*)
from . import lse, reference
from . import config, layout
from .dcp import DcpDecodePlan, dcp_decode_attention
from .backends import BackendError, list_backends
from .merge import merge_attn_states, merge_attn_states_n
from .partition import pcp_partition, pcp_restore
from .pcp import PcpContext, PcpPrefillPlan, pcp_ring_prefill
from .handoff import pcp_to_dcp_handoff

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "config",
    "DcpDecodePlan",
    "dcp_decode_attention",
    "layout",
    "list_backends",
    "lse",
    "merge_attn_states",
    "merge_attn_states_n",
    "PcpContext",
    "PcpPrefillPlan",
    "pcp_partition",
    "pcp_restore",
    "pcp_ring_prefill",
    "pcp_to_dcp_handoff",
    "reference",
]
