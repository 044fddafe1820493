"""A thread's time slice under Linux's EEVDF scheduler (``sched_setattr``, kernel >= 6.12).

A task woken with a shorter slice than the one running may preempt it at once
(the scheduler's PREEMPT_SHORT); one with the default slice waits while the running task
is protected for its slice (RUN_TO_PARITY: 0.7 ms x (1 + log2 cores), 1.4 ms on 2 cores,
2.8 ms on 8 or more). The server gives its front end (the event loop, gRPC core's threads, the
decode pool) a short slice (``--front-slice-us``, 0.1 ms by default) and leaves the
inference threads the default: a refusal or a health check then waits no longer for a
batch's threads than the kernel's switch, with no change to how the CPU is shared
(weights and nice levels are kept).

Older kernels accept the call and ignore the slice of a normal task; elsewhere (not
Linux, no ``syscall`` number for the machine, a seccomp profile that refuses it) nothing is
done and ``set_slice`` says so by returning False.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading

MIN_SLICE_US, MAX_SLICE_US = 100, 100_000  # the slices the kernel takes (0.1 .. 100 ms)
DEFAULT = 0  # the kernel's default slice

# (sched_setattr, sched_getattr) syscall numbers
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275), "arm64": (274, 275)}


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER1."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library's ``syscall`` (the process's own symbols: no search, no subprocess)."""
    if not sys.platform.startswith("linux") or platform.machine() not in _SYSCALLS:
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def set_slice(slice_ns: int, tid: int = 0) -> bool:
    """Give thread ``tid`` (0: the calling thread) a slice of ``slice_ns`` nanoseconds
    (``DEFAULT``: the kernel's), keeping its policy and nice level; threads it creates
    afterwards inherit it. True when the kernel took it. Only normal (SCHED_OTHER) and
    batch threads are touched: an idle-policy or real-time thread keeps its own."""
    libc = _libc()
    if libc is None:
        return False
    set_call, get_call = _SYSCALLS[platform.machine()]
    attr = _SchedAttr()
    if libc.syscall(get_call, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return False
    if attr.sched_policy not in (os.SCHED_OTHER, os.SCHED_BATCH):
        return False
    attr.size = ctypes.sizeof(attr)
    attr.sched_flags = 0
    attr.sched_runtime = slice_ns
    return libc.syscall(set_call, tid, ctypes.byref(attr), 0) == 0


def shorten_front_end(slice_ns: int) -> bool:
    """Every thread of this process that exists now (the main thread, gRPC core's) and
    every thread they start from now on get ``slice_ns``; the inference threads take the
    default back (``cores.lower_thread_priority``). True when the kernel keeps it
    (Linux >= 6.12)."""
    try:
        tids = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return False
    for tid in tids:
        set_slice(slice_ns, tid)
    return thread_slice_ns() == slice_ns


def thread_slice_ns(tid: int = 0, pid: int | str = "self") -> int | None:
    """The slice the kernel has for thread ``tid`` (0: the calling thread) of process
    ``pid`` (``/proc``'s ``se.slice``), or None."""
    tid = tid or threading.get_native_id()
    try:
        with open(f"/proc/{pid}/task/{tid}/sched") as sched:
            for line in sched:
                if line.startswith("se.slice"):
                    return int(float(line.split(":")[1]))
    except (OSError, ValueError):
        return None
    return None
