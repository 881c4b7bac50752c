"""bench/device_check.py --dry-run: the GPU device check's own code at tiny sizes on CPU under
the Triton interpreter, so the script cannot rot between GPU runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton package is not installed (pip install cpattn[triton])")

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--dry-run",
                          "--json", str(tmp_path / "dc.json"), "--md", str(tmp_path / "dc.md")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "dc.json").read_text())
    assert out["dry_run"] and out["env"]["TRITON_INTERPRET"] == "1"
    sections = {r["section"] for r in out["correctness"]}
    assert sections == {"merge", "paged", "varlen"}
    assert all(r.get("ok") is True for r in out["correctness"]), out["correctness"]
    impls = {(r["section"], r.get("impl")) for r in out["timing"]}
    for sec in ("merge", "paged", "varlen"):
        assert {(sec, "triton"), (sec, "pytorch backend"), (sec, "eager formula")} <= impls, impls
        assert not [r for r in out["timing"] if r["section"] == sec and str(r.get("status", "")).startswith("error")]
    assert out["graph"]["status"] == "ok" or out["graph"]["status"].startswith("skipped: no plan/run API")
    assert "| paged |" in (tmp_path / "dc.md").read_text()
