"""cpattn-bench's command line: bad arguments give argparse's usage and an error naming the
argument (exit code 2), never a traceback, and nothing is benchmarked (issue 11, item 11)."""
from __future__ import annotations

import pytest

from cpattn.bench import cli


@pytest.mark.parametrize("argv, word", [
    (["merge", "--ways", "0"], "argument --ways: expected an integer > 0"),
    (["merge", "--ways", "2,x"], "argument --ways"),
    (["merge", "--ways", "2,,4"], "argument --ways"),
    (["merge", "--dtype", "float64"], "argument --dtype: invalid choice"),
    (["merge", "--backends", "pytorch,nope"], "argument --backends: invalid choice"),
    (["merge", "--tokens", "-5"], "argument --tokens"),
    (["merge", "--head-dim", "abc"], "argument --head-dim"),
    (["merge", "--iters", "0"], "argument --iters"),
    (["merge", "--json", "/no/such/dir/out.json"], "argument --json: directory"),
    (["dcp", "--world", "2,0"], "argument --world"),
    (["dcp", "--world", "3"], "--world 3: the gqa shape's 32 query heads must divide"),
    (["dcp", "--shapes", "gqa,xl"], "argument --shapes: invalid choice"),
    (["dcp", "--block-size", "0"], "argument --block-size"),
    (["dcp", "--context", "-1"], "argument --context"),
    (["pcp", "--length", "0"], "argument --length"),
    (["pcp", "--world", "0"], "argument --world"),
    (["pcp", "--heads", "6", "--kv-heads", "4"], "--heads .6. must be a multiple of --kv-heads .4."),
    (["pcp", "--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["pcp", "--threads", "two"], "argument --threads"),
    (["pcp", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["pcp", "--methods", "tree"], "argument --methods: invalid choice"),
    (["nosuch"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_argparse_message(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: cpattn-bench" in err and "error:" in err and "Traceback" not in err
    assert __import__("re").search(word, err), err


def test_backend_that_cannot_run_here_is_an_argument_error(capsys, monkeypatch):
    from cpattn.backends import registry

    monkeypatch.setitem(registry._loaded, "triton", "not importable: test")
    with pytest.raises(SystemExit) as exc:
        cli.main(["merge", "--backends", "triton"])
    assert exc.value.code == 2 and "--backends triton: cannot run here" in capsys.readouterr().err
