"""Dynamic batching: single requests in, batches of up to ``max_batch_size`` rows out.

One :class:`Batcher` per served model version. Callers ``submit`` a tensor of one or
more rows (``[n, C, H, W]``) and get a ``Future`` of that request's outputs. Worker
threads (``instances``, Triton's instance count) take turns forming a batch. Batching
adapts to load: a lone request that finds every instance idle runs at once (no queue
delay); when the model is busy (a batch running, or several requests waiting), the
first waiting request opens a batch that closes when ``max_batch_size`` rows are in or
``max_queue_delay`` has passed since that first request arrived. While one instance
runs a batch, the next one forms its own.

- The queue is bounded: ``submit`` raises ``ResourceExhausted`` when it is full. Tiles
  of a large image (``tile=True``) have a bound of their own, the same size: they never
  take the places of whole requests (streams mixing tiled and small images had 436-662
  of 1,000 streams answered "queue full" in-band when they shared one), and a tiled
  image submits its next tiles when there is room (``TiledRun``).
- Requests whose deadline has passed, or that their caller cancelled, are dropped
  before the batch runs: they never reach the backend.
- Requests are grouped by shape (``collate``, a pure function); each group runs as
  its own batch(es).
- A failing batch fails each of its requests with one error; the worker goes on.
- ``close`` drains: everything accepted before it still runs.
- A request whose caller waits for it in its own thread (``inline=True``) and that
  finds the queue empty and an instance free runs at once in the caller's thread (a
  batch of one), skipping two thread hand-offs; ``instances`` still bounds how many
  batches run at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from visionserve.server.cores import lower_thread_priority
from visionserve.server.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    VisionServeError,
)

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
InferFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class QueuedRequest:
    """One submitted request waiting in a batcher's queue."""

    tensor: np.ndarray  # [rows, ...]
    future: Future
    enqueued_at: float  # time.monotonic()
    deadline: float | None  # time.monotonic() after which it must not run
    tile: bool = False  # a tile of a larger image (bounded apart from whole requests)

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])


class _Stop:
    """The queue item that tells one worker to exit (after everything queued before it)."""

    def __repr__(self) -> str:
        return "STOP"


STOP = _Stop()


@dataclass(frozen=True)
class Batch:
    """Requests ``indices`` (positions in collate's input) stacked into ``tensor``."""

    indices: tuple[int, ...]
    tensor: np.ndarray


def collate(tensors: Sequence[np.ndarray], max_batch_size: int) -> list[Batch]:
    """Group tensors by shape (rows excluded) and dtype, and pack each group into batches.

    Arrival order is kept within a group; groups come in the order of their first
    member. A request is never split across batches, and no batch has more than
    ``max_batch_size`` rows. Raises ``ValueError`` for a tensor without rows or with
    more rows than ``max_batch_size``.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    groups: dict[tuple, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.ndim < 1 or not 1 <= tensor.shape[0] <= max_batch_size:
            raise ValueError(
                f"request {index} has shape {tensor.shape}: expected 1..{max_batch_size} rows"
            )
        groups.setdefault((tensor.shape[1:], tensor.dtype.str), []).append(index)
    batches = []
    for members in groups.values():
        current: list[int] = []
        rows = 0
        for index in members:
            n = tensors[index].shape[0]
            if current and rows + n > max_batch_size:
                batches.append(_stack(tensors, current))
                current, rows = [], 0
            current.append(index)
            rows += n
        batches.append(_stack(tensors, current))
    return batches


def _stack(tensors: Sequence[np.ndarray], indices: list[int]) -> Batch:
    if len(indices) == 1:
        tensor = np.ascontiguousarray(tensors[indices[0]])
    else:
        tensor = np.concatenate([tensors[i] for i in indices], axis=0)
    return Batch(tuple(indices), tensor)


def uncollate(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[Outputs]:
    """Split a batch's outputs back into one dict per request (``rows`` each).

    Raises ``ValueError`` when an output's first dimension is not the batch's rows.
    """
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim < 1 or array.shape[0] != total:
            raise ValueError(
                f"the model returned {name!r} with shape {array.shape} for a batch of "
                f"{total} rows: expected {total} rows"
            )
    offsets = np.cumsum([0, *rows])
    return [
        {name: array[offsets[i] : offsets[i + 1]] for name, array in outputs.items()}
        for i in range(len(rows))
    ]


class BatchObserver(Protocol):
    """Receives the batcher's measurements (``metrics.ModelMetrics`` implements it)."""

    def on_queued(self, seconds: float) -> None: ...

    def on_batch(self, size: int, seconds: float) -> None: ...


class Batcher:
    """Bounded queue + ``instances`` worker threads calling ``infer`` on batches."""

    def __init__(
        self,
        name: str,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        queue_size: int,
        instances: int = 1,
        observer: BatchObserver | None = None,
        nice: int = 0,
    ) -> None:
        """``nice``: the worker threads lower their priority by that many steps (the
        threads that run a CPU model; ``cores.lower_thread_priority``)."""
        if max_batch_size < 1:
            raise ValueError(f"{name}: max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"{name}: max_queue_delay must be >= 0, got {max_queue_delay_s}")
        if queue_size < 1 or instances < 1:
            raise ValueError(
                f"{name}: queue_size and instances must be at least 1, got {queue_size}, {instances}"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._infer = infer
        self._observer = observer
        self._nice = nice
        self._queue: queue.Queue[QueuedRequest | _Stop] = queue.Queue()
        self._queue_size = queue_size
        self._waiting = [0, 0]  # whole requests, tiles in the queue (under _submit_lock)
        self._submit_lock = threading.Lock()
        self._collect_lock = threading.Lock()
        self._slots = threading.Semaphore(instances)  # batches running at once
        self._running = 0  # batches running now (read without a lock: a hint)
        self._running_lock = threading.Lock()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(instances)
        ]
        self._started = threading.Semaphore(0)  # a worker has set its priority
        for worker in self._workers:
            worker.start()
        for _ in self._workers:  # no batch, nor a look at the threads, before that
            self._started.acquire()

    @property
    def queue_size(self) -> int:
        return self._queue_size

    def depth(self) -> int:
        """Requests waiting (approximate)."""
        return self._queue.qsize()

    def idle(self) -> bool:
        """Nothing waiting and no batch running (a hint: read without a lock)."""
        return self._running == 0 and self._queue.empty()

    def submit(
        self,
        tensor: np.ndarray,
        deadline: float | None = None,
        *,
        inline: bool = False,
        tile: bool = False,
    ) -> Future:
        """Queue ``tensor`` ([rows, ...]); the future resolves to its outputs (same rows).

        ``inline=True`` is for a caller that waits for the result right away: when the
        queue is empty, the queue delay 0 and an instance free, the request runs in the
        caller's thread before ``submit`` returns (the future is then already done).
        ``tile=True``: a tile of a larger image, queued within the tiles' own bound.

        Raises ``InvalidArgument`` (bad rows), ``DeadlineExceeded`` (deadline already
        passed), ``ResourceExhausted`` (queue full) or ``Unavailable`` (closed).
        """
        if tensor.ndim < 1 or not 1 <= tensor.shape[0] <= self.max_batch_size:
            raise InvalidArgument(
                f"{self.name}: a request of shape {list(tensor.shape)} has "
                f"{tensor.shape[0] if tensor.ndim else 0} rows: expected 1..{self.max_batch_size} "
                f"(max_batch_size)"
            )
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded(
                f"{self.name}: the request's deadline passed before it was queued"
            )
        item = QueuedRequest(tensor, Future(), now, deadline, tile)
        with self._submit_lock:
            if self._closed:
                raise Unavailable(f"{self.name} is being unloaded or the server is shutting down")
            inline = (
                inline
                and self._queue.empty()
                and self._slots.acquire(blocking=False)
            )
            if not inline:
                if self._waiting[tile] >= self._queue_size:
                    what = "tile" if tile else "request"
                    raise ResourceExhausted(
                        f"{self.name}: the {what} queue is full ({self.queue_size} {what}s "
                        f"waiting): retry later, or raise max_queue_size"
                    )
                self._waiting[tile] += 1
                self._queue.put_nowait(item)
        if inline:
            self._run_inline(item)
        return item.future

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, run everything already queued, join the workers."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._queue.put(STOP)  # after everything queued before it
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for _ in self._workers:  # batches running in callers' threads finish too
            self._slots.acquire()
        for _ in self._workers:
            self._slots.release()

    def _run_inline(self, item: QueuedRequest) -> None:
        """Run one request as its own batch in the caller's thread (holding a slot)."""
        try:
            item.future.set_running_or_notify_cancel()
            if self._observer is not None:
                self._observer.on_queued(0.0)
            tensor = np.ascontiguousarray(item.tensor)
            _deliver([self._execute([item], tensor, holding_slot=True)])
        finally:
            self._slots.release()

    # -- workers ---------------------------------------------------------------
    def _work(self) -> None:
        """Collect, stack, run; the results of a batch are handed out only once the
        next batch is stacked (or none is waiting), right before it runs.

        The order matters in one Python process: handing results out wakes the callers'
        threads, and they hold the GIL while they answer. Stacking (a numpy copy that
        lets the GIL go) after that would wait behind every one of them, leaving the
        backend idle; stacked first, the next batch reaches the backend at once.
        """
        try:
            lower_thread_priority(self._nice)
        finally:
            self._started.release()
        held: list[_Done] = []  # the last batch's results, not yet handed out
        while True:
            if held and not self._collect_lock.acquire(blocking=False):
                _deliver(held)  # another instance is collecting: it may wait a long time
                held = []
            if not held:
                self._collect_lock.acquire()
            try:
                items, stop = self._collect(block=not held)
            finally:
                self._collect_lock.release()
            batches = self._prepare(items) if items else []
            _deliver(held)
            held = []
            for i, (members, tensor) in enumerate(batches):
                done = self._execute(members, tensor)
                if i + 1 < len(batches):
                    _deliver([done])
                else:
                    held = [done]
            if stop:
                _deliver(held)
                return

    def _collect(self, block: bool = True) -> tuple[list[QueuedRequest], bool]:
        """Take a first request (waiting for one if ``block``), then gather more until
        full or the delay is up."""
        try:
            first = self._queue.get() if block else self._queue.get_nowait()
        except queue.Empty:
            return [], False
        if isinstance(first, _Stop):
            return [], True
        self._taken(first)
        items, rows = [first], first.rows
        flush_at = first.enqueued_at + self.max_queue_delay_s
        while rows < self.max_batch_size:
            # Adaptive: an idle model runs a lone request at once; a busy one gathers.
            busy = len(items) > 1 or self._running > 0
            remaining = flush_at - time.monotonic() if busy else 0.0
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                return items, True
            self._taken(item)
            items.append(item)
            rows += item.rows
        return items, False

    def _taken(self, item: QueuedRequest) -> None:
        with self._submit_lock:
            self._waiting[item.tile] -= 1

    def _prepare(self, items: list[QueuedRequest]) -> list[tuple[list[QueuedRequest], np.ndarray]]:
        """Drop cancelled and expired requests; stack the rest into batches."""
        now = time.monotonic()
        live = []
        for item in items:
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller gave up
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(
                    DeadlineExceeded(
                        f"{self.name}: the deadline passed after {now - item.enqueued_at:.3f} s "
                        f"in the queue; the request did not run"
                    )
                )
                continue
            if self._observer is not None:
                self._observer.on_queued(now - item.enqueued_at)
            live.append(item)
        try:
            batches = collate([item.tensor for item in live], self.max_batch_size)
        except ValueError as exc:  # submit checks rows, so this is a bug: fail, never die
            self._fail(live, exc)
            return []
        return [([live[i] for i in batch.indices], batch.tensor) for batch in batches]

    def _execute(
        self, members: list[QueuedRequest], tensor: np.ndarray, holding_slot: bool = False
    ) -> _Done:
        """Run one batch; its per-request outputs, or the error that fails all of them."""
        if not holding_slot:
            self._slots.acquire()
        self._count_running(+1)
        start = time.monotonic()
        try:
            try:
                outputs = self._infer(tensor)
            finally:
                self._count_running(-1)
                if not holding_slot:
                    self._slots.release()
            parts: list[Outputs] | Exception = uncollate(outputs, [m.rows for m in members])
        except Exception as exc:  # noqa: BLE001 - a failing batch fails its requests only
            parts = self._error(members, exc)
        else:
            if self._observer is not None:
                self._observer.on_batch(int(tensor.shape[0]), time.monotonic() - start)
        return members, parts

    def _count_running(self, change: int) -> None:
        with self._running_lock:
            self._running += change

    def _error(self, members: list[QueuedRequest], exc: Exception) -> VisionServeError:
        if isinstance(exc, VisionServeError):
            return exc
        rows = sum(m.rows for m in members)
        log.error("%s: a batch of %d rows failed", self.name, rows, exc_info=exc)
        return BackendError(
            f"{self.name}: inference failed for a batch of {rows} rows: {type(exc).__name__}: {exc}"
        )

    def _fail(self, members: list[QueuedRequest], exc: Exception) -> None:
        _deliver([(members, self._error(members, exc))])


_Done = tuple[list[QueuedRequest], "list[Outputs] | Exception"]


def _deliver(done: list[_Done]) -> None:
    """Resolve each request's future with its outputs, or fail it with the batch's error."""
    for members, parts in done:
        if isinstance(parts, Exception):
            for member in members:
                if not member.future.done():
                    member.future.set_exception(parts)
        else:
            for member, part in zip(members, parts, strict=True):
                member.future.set_result(part)
