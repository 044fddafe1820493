"""CPU placement for the benches: a process's threads on given CPUs, restored after."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def on_cpus(pid: int, cpus: set[int] | frozenset[int]) -> Iterator[None]:
    """Every thread of process ``pid`` (thread pools that outlive a call included) on
    ``cpus``; threads it starts meanwhile inherit them. Restored after."""
    saved = {}
    for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid, affinity in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, affinity)


@contextlib.contextmanager
def pinned(server_pid: int) -> Iterator[None]:
    """Every server thread on CPU 0, this thread (the latency client, and bare) on the
    last CPU, as a load generator gets its own cores; affinities restored after."""
    cpus = sorted(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    with on_cpus(server_pid, {cpus[0]}):
        os.sched_setaffinity(0, {cpus[-1]})
        try:
            yield
        finally:
            os.sched_setaffinity(0, mine)
