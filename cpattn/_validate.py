"""Small input checks shared by the public ops. Every error names the op and the argument.

Shape, dtype and device problems raise ``ValueError`` / ``TypeError`` before anything is
written, so an op that refuses its input leaves every tensor as it was.
"""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(op: str, name: str, x, *, dim: int | None = None, min_dim: int | None = None,
           dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    """Check that ``x`` is a tensor with the given rank and dtype; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(x).__name__}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dims; got shape {tuple(x.shape)}")
    if min_dim is not None and x.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dims; got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{op}: {name} must have dtype {allowed}; got {str(x.dtype).replace('torch.', '')}")
    return x


def lse_tensor(op: str, name: str, x, expected_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """An LSE: float32 (the contract), shaped like its ``out`` without the last dim."""
    tensor(op, name, x)
    if x.dtype != torch.float32:
        raise TypeError(
            f"{op}: {name} must be float32 (cpattn's LSE contract: float32, natural log); got "
            f"{str(x.dtype).replace('torch.', '')}. Convert foreign LSEs with cpattn.lse first."
        )
    if tuple(x.shape) != tuple(expected_shape):
        raise ValueError(
            f"{op}: {name} must have the shape of its out without the last dim, "
            f"{tuple(expected_shape)}; got {tuple(x.shape)}"
        )
    return x


def same(op: str, what: str, named: dict[str, torch.Tensor], attr: str) -> None:
    """All tensors in ``named`` agree on ``attr`` (``"dtype"``, ``"device"`` or ``"shape"``)."""
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        a, b = getattr(first, attr), getattr(t, attr)
        if (tuple(a) if attr == "shape" else a) != (tuple(b) if attr == "shape" else b):
            raise (TypeError if attr == "dtype" else ValueError)(
                f"{op}: {name} and {first_name} must have the same {what}; got {b} and {a}"
            )


def same_device(op: str, named: dict[str, torch.Tensor]) -> None:
    same(op, "device", named, "device")


def out_tensor(op: str, name: str, x, *, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A caller-provided output buffer: exact shape, dtype and device."""
    tensor(op, name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}; got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}; got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{op}: {name} must be on {device}; got {x.device}")
    return x


def forward_only(op: str, named: dict[str, torch.Tensor]) -> None:
    """cpattn's ops have no backward: refuse inputs that require grad while grad mode is on,
    rather than fail inside a kernel or hand back outputs that autograd cannot differentiate."""
    if not torch.is_grad_enabled():
        return
    for name, t in named.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but cpattn's ops are forward-only (no backward is "
                             f"implemented); pass detached tensors or call under torch.no_grad() / "
                             f"torch.inference_mode()")


def positive_int(op: str, name: str, x, *, allow_zero: bool = False) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{op}: {name} must be an int; got {type(x).__name__}")
    if x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{op}: {name} must be {'>= 0' if allow_zero else '> 0'}; got {x}")
    return x


def scale_value(op: str, scale, head_dim: int) -> float:
    """``scale`` or the default ``1/sqrt(head_dim)``; must be a finite float."""
    import math

    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite; got {scale}")
    return float(scale)
