"""The fixed device buffers of a :class:`cpattn.DcpDecodePlan`'s ``run``, allocated once.

A plan allocates, at construction and at its maximum sizes (``max_num_tokens`` rows), every
buffer the hot path of ``run`` reuses from layer to layer:

``send``, ``recv`` (bytes)
    the combine's collective buffers: the packed ``[lse | out]`` row this rank sends and the
    ``N`` rows it receives (``all_gather``, ``all_to_all``); for ``lse_reduce`` the partial
    LSEs sent and gathered, and the rescaled outputs summed in place (by their destination
    rank's heads when sharded, with the reduce-scatter's own result beside them).
``part_out``
    the local kernel's partial output where the strategy does not let the kernel write into
    the send buffer itself (``all_gather`` does: no packing copy).
``q_gather``, ``q_heads``
    ``heads="sharded"``: the gathered query heads, and their ``[T, Hq, D]`` reordering.
``merge_out``, ``merge_lse``
    sharded ``all_gather``: this rank's heads of every rank's partial, made dense for the merge.
``kernel``
    the local kernel's own scratch (its registry ``reserve``; the PyTorch kernel's chunk
    buffers), a dict the kernel reuses on every call.

What ``run`` still allocates: the tensors it returns, per-row temporaries of ``O(Tp * Hq)``
elements or ``O(Tp * Hq * D)`` (the kernels' softmax state, merge weights), and in the PyTorch
kernel per-chunk index and mask tensors. With static bounds (graph capture) all of it is sized by
``q``'s padded row count and the plan's maxima only; in eager ``run`` the PyTorch kernel's
chunks follow the step's longest local length (a host int from ``plan()``, never a device
read), so those per-chunk temporaries are bounded by the plan's maxima but not fixed. Under
CUDA-graph capture they come from the graph's private pool and keep their addresses on replay.
"""
from __future__ import annotations

import torch

__all__ = ["Workspace", "allocate"]


class Workspace:
    """Named flat byte buffers; :meth:`view` gives a typed, shaped view of a buffer's prefix."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}
        self.kernel: dict = {}

    def add(self, name: str, nbytes: int) -> None:
        self.buffers[name] = torch.empty(max(int(nbytes), 0), dtype=torch.uint8, device=self.device)

    def view(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """The first ``prod(shape)`` elements of buffer ``name`` as ``dtype``, shaped ``shape``.
        Raises RuntimeError when the buffer was sized for less (a plan's maximum exceeded)."""
        n = 1
        for s in shape:
            n *= int(s)
        nbytes = n * dtype.itemsize
        buf = self.buffers[name]
        if nbytes > buf.numel():
            raise RuntimeError(f"DcpDecodePlan workspace {name!r} holds {buf.numel()} bytes; {nbytes} needed "
                               f"for {tuple(shape)} {dtype} (more rows than max_num_tokens?)")
        return buf[:nbytes].view(dtype).view(*shape)

    def has(self, name: str) -> bool:
        return name in self.buffers

    @property
    def nbytes(self) -> int:
        """Bytes of the named buffers (the kernel's scratch not included)."""
        return sum(b.numel() for b in self.buffers.values())

    def kernel_storages(self) -> list[torch.UntypedStorage]:
        """The storages of the local kernel's scratch kept in :attr:`kernel` (each once)."""
        found: dict[int, torch.UntypedStorage] = {}

        def walk(x):
            if isinstance(x, torch.Tensor):
                found.setdefault(x.untyped_storage().data_ptr(), x.untyped_storage())
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif hasattr(x, "__dict__"):
                walk(vars(x))

        walk(self.kernel)
        return list(found.values())

    def kernel_nbytes(self) -> int:
        """Bytes of the local kernel's scratch buffers kept in :attr:`kernel`."""
        return sum(s.nbytes() for s in self.kernel_storages())


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def allocate(*, world: int, strategy: str, heads: str, max_tokens: int, num_heads: int, head_dim: int,
             v_head_dim: int, dtype: torch.dtype, partial_dtype: torch.dtype, device) -> Workspace:
    """The buffers ``run`` needs for one plan's static facts (none at world size 1, where the
    kernel's output is the result)."""
    ws = Workspace(device)
    n, T, H, D, Dv = world, max_tokens, num_heads, head_dim, v_head_dim
    if n == 1:
        return ws
    e = torch.empty((), dtype=dtype).element_size()
    a = torch.empty((), dtype=partial_dtype).element_size()
    S = H // n
    if heads == "sharded":
        ws.add("q_gather", n * T * S * D * e)
        ws.add("q_heads", T * H * D * e)
    if strategy == "all_gather":
        row = _pad(T * H * (a + Dv * e), a)
        ws.add("send", row)
        ws.add("recv", n * row)
        if heads == "sharded":
            ws.add("merge_out", n * T * S * Dv * e)
            ws.add("merge_lse", n * T * S * a)
    elif strategy == "all_to_all":
        row = _pad(T * S * (a + Dv * e), a)
        ws.add("part_out", T * H * Dv * e)
        ws.add("send", n * row)
        ws.add("recv", n * row)
    elif strategy == "lse_reduce":
        ws.add("part_out", T * H * Dv * e)
        ws.add("send", T * H * a)  # the partial LSEs
        ws.add("recv", n * T * H * a)
        ws.add("scaled", T * H * Dv * a)  # rescaled outputs, summed in place / by destination
        if heads == "sharded":
            ws.add("summed", T * S * Dv * a)
    else:
        raise ValueError(f"unknown combine strategy {strategy!r}")
    return ws
