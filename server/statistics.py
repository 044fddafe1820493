"""Triton-style inference statistics of one model version (KServe ``ModelStatistics``).

``InferenceStatistics`` is a ``batcher.BatchObserver`` (queue time, batches and their
backend time) and counts requests that succeeded or failed, over every protocol.
``Observers`` lets the batcher report to it and to the Prometheus metrics at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

from visionserve.server.batcher import BatchObserver


@dataclass(frozen=True)
class Duration:
    """How many events, and their total time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> Duration:
        return Duration(self.count + count, self.ns + max(0, int(seconds * 1e9)))


@dataclass(frozen=True)
class StatisticsSnapshot:
    """A consistent copy of the counters (what ``ModelStatistics`` answers)."""

    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_infer: Duration = Duration()
    inference_count: int = 0  # images (tensor rows) inferred
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0  # wall clock, ms since the epoch; 0: none yet
    batches: dict[int, Duration] = field(default_factory=dict)  # by batch size


class InferenceStatistics:
    """Thread-safe counters of one model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = StatisticsSnapshot()

    def on_queued(self, seconds: float) -> None:
        with self._lock:
            self._state = replace(self._state, queue=self._state.queue.add(seconds))

    def on_batch(self, size: int, seconds: float) -> None:
        with self._lock:
            s = self._state
            batches = dict(s.batches)
            batches[size] = batches.get(size, Duration()).add(seconds)
            self._state = replace(
                s,
                compute_infer=s.compute_infer.add(seconds),
                inference_count=s.inference_count + size,
                execution_count=s.execution_count + 1,
                last_inference_ms=int(time.time() * 1000),
                batches=batches,
            )

    def on_request(self, seconds: float, ok: bool) -> None:
        """One request to this model ended, ``ok`` or failed, after ``seconds``."""
        with self._lock:
            s = self._state
            if ok:
                self._state = replace(s, success=s.success.add(seconds))
            else:
                self._state = replace(s, fail=s.fail.add(seconds))

    def snapshot(self) -> StatisticsSnapshot:
        with self._lock:
            return self._state

    def reset(self) -> None:
        """Forget everything so far (after warm-up: Triton does not count it either)."""
        with self._lock:
            self._state = StatisticsSnapshot()


class Observers:
    """Several ``BatchObserver``s as one."""

    def __init__(self, *observers: BatchObserver | None) -> None:
        self._observers = [o for o in observers if o is not None]

    def on_queued(self, seconds: float) -> None:
        for observer in self._observers:
            observer.on_queued(seconds)

    def on_batch(self, size: int, seconds: float) -> None:
        for observer in self._observers:
            observer.on_batch(size, seconds)
