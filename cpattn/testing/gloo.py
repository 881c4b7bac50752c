"""Run functions on N real gloo ranks on this machine, with timeouts so a hang fails fast.

``GlooWorld(n)`` starts N worker processes once (``spawn``), each joined to one gloo process
group, and keeps them for many calls: ``world.run(fn, *args)`` sends the same call to every rank
and returns the per-rank results in rank order. ``fn`` must be importable by reference (a
module-level function); it may read ``cpattn.testing.gloo.RANK``/``WORLD`` or call
``torch.distributed.get_rank()``.

If any rank raises, :class:`RankErrors` is raised with every rank's outcome. If a call does not
finish within ``timeout`` seconds, the workers are killed, ``TimeoutError`` is raised, and the
next call starts fresh workers. The process group itself is created with the same timeout, so a
collective that waits for a rank that never comes errors out instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

__all__ = ["GlooWorld", "RankErrors", "Outcome", "RANK", "WORLD"]

RANK = 0
WORLD = 1


@dataclass
class Outcome:
    ok: bool
    value: Any = None
    error_type: str = ""
    message: str = ""
    trace: str = ""


class RankErrors(RuntimeError):
    """At least one rank raised; ``outcomes[r]`` says what each rank did."""

    def __init__(self, outcomes: list[Outcome]):
        self.outcomes = outcomes
        lines = [
            f"rank {r}: " + ("ok" if o.ok else f"{o.error_type}: {o.message}") for r, o in enumerate(outcomes)
        ]
        first = next((o for o in outcomes if not o.ok), None)
        super().__init__("\n".join(lines) + ("\n--- first traceback ---\n" + first.trace if first else ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results, threads: int, timeout: float) -> None:
    global RANK, WORLD
    RANK, WORLD = rank, world
    torch.set_num_threads(threads)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    results.put((rank, Outcome(True, "ready")))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            out = Outcome(True, fn(*args, **kwargs))
        except BaseException as exc:  # report everything, keep serving
            out = Outcome(False, None, type(exc).__name__, str(exc), traceback.format_exc())
        try:
            results.put((rank, out))
        except Exception as exc:  # unpicklable result
            results.put((rank, Outcome(False, None, type(exc).__name__, f"result not picklable: {exc}")))
    dist.destroy_process_group()


class GlooWorld:
    """N persistent gloo ranks (processes) on this machine; see the module docstring."""

    def __init__(self, world_size: int, *, timeout: float = 60.0, threads: int = 1):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.threads = threads
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self._tasks[r], self._results, self.threads, self.timeout),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect(self.timeout + 60.0)  # wait for "ready" from every rank (imports take a while)

    def _collect(self, timeout: float) -> list[Outcome]:
        got: dict[int, Outcome] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(got) < self.world_size:
            try:
                r, out = self._results.get(timeout=0.2)
                got[r] = out
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
            if dead or datetime.datetime.now() > deadline:
                missing = sorted(set(range(self.world_size)) - set(got))
                self.close()
                why = f"rank processes {dead} died" if dead else f"no answer within {timeout:.0f}s"
                raise TimeoutError(
                    f"gloo world of {self.world_size}: ranks {missing} did not answer ({why}); workers restarted"
                )
        return [got[r] for r in range(self.world_size)]

    def run_outcomes(self, fn: Callable, *args, timeout: float | None = None, **kwargs) -> list[Outcome]:
        """Call ``fn(*args, **kwargs)`` on every rank; the per-rank outcomes (never raises for rank
        errors; raises TimeoutError on a hang)."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        outcomes = self._collect(self.timeout if timeout is None else timeout)
        if len({o.ok for o in outcomes}) > 1:
            # Some ranks failed and others did not: their collectives may be out of step.
            self.close()
        return outcomes

    def run(self, fn: Callable, *args, timeout: float | None = None, **kwargs) -> list[Any]:
        """Call ``fn`` on every rank; the per-rank return values, or :class:`RankErrors`."""
        outcomes = self.run_outcomes(fn, *args, timeout=timeout, **kwargs)
        if not all(o.ok for o in outcomes):
            raise RankErrors(outcomes)
        return [o.value for o in outcomes]

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        self._procs = []

    def __enter__(self) -> "GlooWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def env_threads() -> int:
    """Threads per rank for tests and benches (``CPATTN_RANK_THREADS``, default 1)."""
    return int(os.environ.get("CPATTN_RANK_THREADS", "1"))
