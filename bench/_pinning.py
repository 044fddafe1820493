"""Pin a server process to one CPU and this process to another, for latency figures."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def pinned(server_pid: int) -> Iterator[None]:
    """Every server thread on CPU 0, this process (the latency client, and bare) on the
    last CPU, as a load generator gets its own cores; affinities restored after."""
    cpus = sorted(os.sched_getaffinity(0))
    tasks = [int(t) for t in os.listdir(f"/proc/{server_pid}/task")]
    saved = {tid: os.sched_getaffinity(tid) for tid in tasks}
    mine = os.sched_getaffinity(0)
    try:
        for tid in tasks:
            os.sched_setaffinity(tid, {cpus[0]})
        os.sched_setaffinity(0, {cpus[-1]})
        yield
    finally:
        os.sched_setaffinity(0, mine)
        for tid, affinity in saved.items():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(tid, affinity)
