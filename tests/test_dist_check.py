"""cpattn.testing.dist_check, the command that checks the distributed ops on a real process group
(HCCL on NPUs; docs/ascendc.md), run here with torchrun on 3 gloo ranks through comm's HCCL paths."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cpattn.testing import dist_check


@pytest.mark.distributed
def test_dist_check_passes_on_gloo_through_the_hccl_paths():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m",
         "cpattn.testing.dist_check", "--dist-backend", "gloo", "--device", "cpu", "--quick", "--hccl-paths"],
        capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.endswith(" passed, 0 failed") and int(last.split()[0]) >= 20, last


def test_tolerance_rule_rejects_a_wrong_answer():
    ref = torch.linspace(-1, 1, 50, dtype=torch.float64)
    base = ref.to(torch.bfloat16)
    assert dist_check._close(base, ref, base, torch.bfloat16)[0]
    assert not dist_check._close(base + 0.05, ref, base, torch.bfloat16)[0]
    assert not dist_check._close(base.masked_fill(ref > 0.9, float("nan")), ref, base, torch.bfloat16)[0]
