"""Default positions for varlen attention kernels (the reference's convention, one copy for the
fast kernels; :mod:`cpattn.reference` keeps its own inline so the oracle reads on its own)."""
from __future__ import annotations

import torch


def default_positions(cu_q: list[int], cu_k: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``(q_positions [Tq], k_positions [Tk])``: keys ``0..Lk-1`` per sequence, queries
    bottom-right aligned ``Lk-Lq..Lk-1``."""
    qp, kp = [], []
    for b in range(len(cu_q) - 1):
        lq, lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        qp.append(torch.arange(lk - lq, lk, device=device))
        kp.append(torch.arange(lk, device=device))
    z = torch.zeros(0, dtype=torch.int64, device=device)
    return (torch.cat(qp) if qp else z), (torch.cat(kp) if kp else z)
