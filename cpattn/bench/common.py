"""Timing, bandwidth and table helpers shared by the bench subcommands, and the argument types
that make bad command lines argparse errors (usage line, exit code 2) rather than tracebacks."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device | str = "cpu") -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable[[], object], *, warmup: int = 1, iters: int = 5, device="cpu") -> float:
    """Median wall time of ``fn()`` in seconds over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_bandwidth(nbytes: int = 256 << 20, device="cpu") -> float:
    """This machine's copy bandwidth now, in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), warmup=1, iters=5, device=device)
    return 2 * nbytes / t / 1e9


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> None:
    """Plain fixed-width table on stdout."""
    if title:
        print(f"\n== {title}")
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.3f}"
        return f"{v:.3g}"
    return str(v)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"machine": machine(), **payload}, f, indent=2, default=str)


# ---- argument types: bad values become "cpattn-bench SUB: error: argument --x: ..." (exit 2)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {v}")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def int_list(text: str) -> list[int]:
    """A comma list of integers > 0, e.g. ``2,4``."""
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma list of integers > 0 (e.g. 2,4), got {text!r}")
    return [positive_int(x) for x in items]


def choice_list(choices):
    """Type for a comma list whose items are all in ``choices`` (an iterable of str)."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",")]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"invalid choice(s) {', '.join(map(repr, bad)) or repr(text)}; "
                                             f"choose a comma list of: {', '.join(allowed)}")
        return items

    return parse


def json_path(text: str) -> str:
    """A file path whose directory exists (checked before any benchmark runs)."""
    d = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(d):
        raise argparse.ArgumentTypeError(f"directory {d!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path")
    return text
