"""The C allocator, set for requests of megabytes: freed blocks are kept for the next request.

glibc's malloc hands out blocks above its mmap threshold (128 KiB at first; it rises only
as such blocks are freed, and not for blocks freed by another thread's arena) as fresh
mappings, and gives the top of its heaps back to the kernel past its trim threshold. A
server receiving 3 MB images then maps, zero-fills and unmaps every buffer along the way
(gRPC's slices, the request message, the decoded image): measured, 1,545 page faults and
7.2 ms for a 3 MB request refused at once, 56 faults and 3.9 ms with the mmap threshold
below and a 64 MiB trim threshold (32 MiB, the one set, measured alike in the bench). ``keep_large_blocks`` sets them once, at start-up; the cost is
memory freed but not given back, at most ``TRIM_THRESHOLD`` per malloc arena.

Only on glibc, and only where the operator has not chosen malloc settings of their own
(``GLIBC_TUNABLES`` with ``glibc.malloc.*``, or the older ``MALLOC_*_`` variables).
"""

from __future__ import annotations

import ctypes
import os
import platform

MIB = 1 << 20
MMAP_THRESHOLD = 32 * MIB  # the largest glibc accepts on 64-bit (half its heap size)
TRIM_THRESHOLD = 32 * MIB
_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3


def operator_chose() -> str | None:
    """The environment variable holding the operator's own malloc settings, if any."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if name in os.environ:
            return name
    return None


def keep_large_blocks() -> str:
    """Set glibc's mmap threshold to ``MMAP_THRESHOLD`` and its trim threshold to
    ``TRIM_THRESHOLD`` (fixed: no longer adjusted as blocks are freed). Returns what was
    done, for the start-up log."""
    if platform.libc_ver()[0] != "glibc":
        return "allocator left as it is (not glibc)"
    chosen = operator_chose()
    if chosen is not None:
        return f"allocator left as {chosen} sets it"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return "allocator left as it is (mallopt refused)"
    return (
        f"allocator: blocks up to {MMAP_THRESHOLD // MIB} MiB reused, "
        f"up to {TRIM_THRESHOLD // MIB} MiB free kept per arena"
    )
