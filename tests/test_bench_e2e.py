"""``cpattn-bench e2e`` stays runnable: a tiny run on 2 gloo ranks whose tokens equal the stock model's."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs the cpattn[transformers] extra")

from cpattn.bench import cli, e2e  # noqa: E402

pytestmark = pytest.mark.distributed


def test_bench_e2e_small_run(gloo, capsys):
    assert e2e.bench("qwen2", 2, [9, 1, 4], 3, 4, 2, "allgather", 1, 32, 64, gloo_world=gloo(2))
    out = capsys.readouterr().out
    assert "prompt by prompt: yes" in out and "1 rank" in out and "2 ranks" in out


def test_e2e_not_in_default_tour():
    assert "e2e" in cli.SUBCOMMANDS and "e2e" not in cli.TOUR
