"""The CPU cores this process may run on: one home for the rule the server's thread pools,
ONNX Runtime's default threads and the demo's trainings share."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores in this process's affinity mask (containers and ``taskset`` narrow it), else all."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
