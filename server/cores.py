"""The CPU cores this process may run on, and how its threads share them: one home for
the rule the server's thread pools, ONNX Runtime's default threads and the demo's
trainings share, and for lowering the priority of the threads that run inference."""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from visionserve.server.cgroup_cpu import cpu_quota_cores
from visionserve.server.sched_slice import DEFAULT as DEFAULT_SLICE
from visionserve.server.sched_slice import set_slice

T = TypeVar("T")


def usable_cores() -> int:
    """Cores in this process's affinity mask (cpusets and ``taskset`` narrow it), else
    all; no more than its cgroup's CPU quota (``docker --cpus``, a Kubernetes CPU limit),
    rounded down, at least 1 (``cgroup_cpu``)."""
    return _usable(_affinity(), cpu_quota_cores())


def _usable(affinity: int, quota: float | None) -> int:
    return max(1, affinity if quota is None else min(affinity, math.floor(quota)))


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_cores() -> str:
    """What a start-up log line says of the cores: how many, and what limited them."""
    affinity, quota = _affinity(), cpu_quota_cores()
    limits = f"affinity {affinity}" + ("" if quota is None else f", cgroup CPU quota {quota:g}")
    return f"{_usable(affinity, quota)} usable CPU core(s) ({limits})"


IDLE = 20  # ``steps`` past the lowest nice level: the kernel's idle policy


def lower_thread_priority(steps: int) -> bool:
    """Lower the calling thread's CPU priority by ``steps`` nice steps: True when done.
    ``IDLE`` (20): the idle policy (SCHED_IDLE) instead, so any other thread of ours that
    wakes takes the core at once (nice 19 where that policy cannot be set). Whatever
    ``steps``, the thread gets the kernel's default time slice back (the front end's is
    shorter: ``sched_slice``).

    Linux only, where nice is a thread's own (elsewhere it would lower the whole process,
    so nothing is done). A thread keeps it, and the threads it creates inherit it."""
    if not sys.platform.startswith("linux"):
        return False
    set_slice(DEFAULT_SLICE)
    if steps <= 0:
        return False
    if steps >= IDLE:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return True
        except (OSError, AttributeError):
            steps = 19
    try:
        os.nice(steps)
    except OSError:
        return False
    return True


def call_at_lower_priority(steps: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a new thread whose priority is lowered by ``steps``
    (``lower_thread_priority``; 0: the caller's, with the default time slice), so that
    the threads ``fn`` creates (ONNX Runtime's pool) run at that priority too; its
    result, or its exception raised here."""
    if not sys.platform.startswith("linux"):
        return fn(*args, **kwargs)
    outcome: list[Any] = []

    def lowered() -> None:
        lower_thread_priority(steps)
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=lowered, name="visionserve-lowered", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
