"""``cpattn-bench``: microbenchmarks of every op.

With no arguments it runs the default tour: a short, checked run of every op that exists, on CPU
(distributed ops on gloo ranks); it exits non-zero if any check fails. Subcommands time one op in
detail; ``cpattn-bench SUB --help`` lists their options.

Bad arguments give argparse's usage line and an error naming the argument (exit code 2), never
a traceback: every option has a checking type (:mod:`cpattn.bench.common`), and checks across
options run before any benchmark does.

Each subcommand lives in its own module ``cpattn.bench.<name>`` with ``register(subparsers)``
(adds its parser, with ``func`` set, and optionally ``validate(args) -> message or None``) and
``tour() -> bool`` (a short checked run; True when every check passed); :data:`TOUR` lists the
ones the default tour runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["merge", "pcp", "dcp", "e2e"]
# The default tour. e2e is not in it: its rank processes must import transformers (about 5 s of
# CPU each, on top of torch), so it cannot stay a few seconds; run `cpattn-bench e2e` on its own.
TOUR = ["merge", "pcp", "dcp"]


def _modules():
    return [importlib.import_module(f"cpattn.bench.{name}") for name in SUBCOMMANDS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpattn-bench", description=__doc__.split("\n\n")[0])
    subs = parser.add_subparsers(dest="cmd")
    mods = _modules()
    for m in mods:
        m.register(subs)
    args = parser.parse_args(argv)  # bad values: argparse's usage + error message, exit code 2
    validate = getattr(args, "validate", None)
    msg = validate(args) if validate is not None else None
    if msg:  # checks across arguments: the same form of error, before any benchmark runs
        subs.choices[args.cmd].error(msg)
    if args.cmd is None:
        print("cpattn-bench: default tour (short checked runs of every op on CPU)")
        ok = all([m.tour() for m in mods if m.__name__.rsplit(".", 1)[-1] in TOUR])
        print("\ntour:", "all checks passed" if ok else "SOME CHECKS FAILED")
        return 0 if ok else 1
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
