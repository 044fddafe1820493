"""Admission control: how many requests one model takes in (queued + running).

A request is *admitted* before any work is spent on it (decode included) and released
when its answer is ready. Past the model's limit a request is refused at once with
RESOURCE_EXHAUSTED naming the limit, never left to wait until its deadline passes;
a request whose deadline cannot be met behind the work already admitted is refused the
same way, before inference. Stream items instead wait their turn (``admit``): a
stream is the batch client's flow control. Slots freed go round-robin over the streams
waiting (``key``), oldest item first within a stream, so every stream keeps moving
however many items another one has queued.

The limit is ``max_admitted`` when set; otherwise it is derived from the model's
measured capacity (rows per second over recent batches, all instances; or, where
lower, answers per second while the model stayed backlogged: ``ServedRate``) times
``wait_s``, the longest a request should expect to queue: at 200 images/s and 1 s,
200 requests. It is never below two full batches per instance, which is also the limit
until a batch has been measured: one batch running and the next one forming keep a
batching model busy (with one, 32 requests in flight at a 16-row model measured at 22
images/s were refused ~330 times a second and throughput fell to 0.76 of bare). Whatever
it is (``max_admitted`` included), it is never above the batcher's queue
(``max_queue_size``): every request admitted, in the queue, running or being decoded,
then fits in it however late the batcher's worker gets to take a batch. Past the queue
plus one batch per instance, 1,000 streams saw ~15 % of their items answered "queue full"
in-band; at that bound, still 8 and 22 of 2,000 items in 2 of 23 runs (a lone request
running as a batch of one while a burst was admitted, or the worker waiting for the GIL).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from visionserve.server.errors import ResourceExhausted

log = logging.getLogger(__name__)

EWMA_WEIGHT = 0.2  # of each new batch (or served window) in the capacity estimates
SERVED_WINDOW_S = 0.5  # answers are counted over windows at least this long
SERVED_FRESH_S = 10.0  # an answer rate older than this no longer counts


class ShedObserver(Protocol):
    def on_shed(self, reason: str) -> None: ...


@dataclass(frozen=True)
class AdmissionPolicy:
    """``wait_s`` 0 turns admission control off; ``max_admitted`` 0: derived."""

    wait_s: float = 1.0
    max_admitted: int = 0

    def __post_init__(self) -> None:
        if self.wait_s < 0 or self.max_admitted < 0:
            raise ValueError(
                f"admission wait and max_admitted must be >= 0, got {self.wait_s}, "
                f"{self.max_admitted}"
            )

    @property
    def enabled(self) -> bool:
        return self.wait_s > 0 or self.max_admitted > 0


class ServedRate:
    """Answers per second of a model's whole walk (decode, prepare, queue, inference,
    encode), measured over windows in which it stayed backlogged: at least ``backlog``
    requests admitted throughout, so answers came as fast as the walk could go.

    The inference rate alone (``Admission.on_batch``) overstates capacity where decoding
    costs more than inferring: 3 MB PNGs to the 32x32 test classifier at twice what it
    could answer were admitted 132 at a time (its batcher's bound) while ~60 a second
    were answered: requests waited past their deadlines and held ~3 GB."""

    def __init__(self, backlog: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._backlog, self._clock = backlog, clock
        self._start, self._answered, self._backlogged = clock(), 0, False
        self._rate: float | None = None
        self._measured_at = -math.inf

    def answered(self, admitted: int) -> None:
        """One admitted request was answered; ``admitted`` are those still in."""
        now = self._clock()
        self._answered += 1
        self._backlogged = self._backlogged and admitted >= self._backlog
        elapsed = now - self._start
        if elapsed < SERVED_WINDOW_S:
            return
        if self._backlogged:
            rate, old = self._answered / elapsed, self.rate
            self._rate = rate if old is None else old + EWMA_WEIGHT * (rate - old)
            self._measured_at = now
        self._start, self._answered, self._backlogged = now, 0, admitted >= self._backlog

    @property
    def rate(self) -> float | None:
        """The estimate while fresh (None: never backlogged, or not for a while)."""
        fresh = self._clock() - self._measured_at < SERVED_FRESH_S
        return self._rate if fresh else None


class Admission:
    """The admission gate of one model (thread-safe; waiters are asyncio futures)."""

    def __init__(
        self,
        name: str,
        policy: AdmissionPolicy,
        *,
        instances: int,
        max_batch_size: int,
        max_queue_size: int | None = None,
        observer: ShedObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.policy = policy
        self._floor = 2 * instances * max_batch_size
        # The batcher's queue: admitting more would only move the refusal there (stream
        # items answered "queue full" in-band instead of waiting their turn here).
        self._ceiling = max_queue_size
        self._instances = instances
        self._observer = observer
        self._lock = threading.Lock()
        self._admitted = 0
        self._rows_per_s: float | None = None  # one instance
        self.served = ServedRate(self._floor, clock)
        self._waiters: dict[object, deque[_Waiter]] = {}  # per stream, in turn order

    # -- measurements -------------------------------------------------------------------
    def on_batch(self, rows: int, seconds: float) -> None:
        """One batch ran: update the capacity estimate."""
        if seconds <= 0:
            return
        rate = rows / seconds
        with self._lock:
            old = self._rows_per_s
            self._rows_per_s = rate if old is None else old + EWMA_WEIGHT * (rate - old)

    @property
    def capacity(self) -> float | None:
        """Requests per second: the inference rate over every instance, or the rate of
        answers while backlogged where lower (None until a batch ran)."""
        rate, served = self._rows_per_s, self.served.rate
        inferred = None if rate is None else rate * self._instances
        if served is None or inferred is None:
            return inferred
        return min(inferred, served)

    @property
    def limit(self) -> int:
        if self.policy.max_admitted:
            wanted = self.policy.max_admitted
        else:
            capacity = self.capacity
            wanted = (
                self._floor
                if capacity is None
                else max(self._floor, math.ceil(capacity * self.policy.wait_s))
            )
        return wanted if self._ceiling is None else min(wanted, self._ceiling)

    @property
    def admitted(self) -> int:
        return self._admitted

    # -- admission ----------------------------------------------------------------------
    def try_admit(self, deadline: float | None = None, count: int = 1) -> None:
        """Admit one request of ``count`` images (rows in the batcher's queue) now, or
        raise ``ResourceExhausted`` saying why. On an idle model any count is admitted
        (a request of more images than the limit would otherwise never be)."""
        if not self.policy.enabled:
            with self._lock:
                self._admitted += count
            return
        with self._lock:
            message = self._full(count)
            if message is not None:
                reason = "capacity"
            else:
                reason, message = self._deadline_check(deadline, count)
            if reason is None:
                self._admitted += count
                return
        self.shed(reason)
        raise ResourceExhausted(message)

    def full_message(self, count: int = 1) -> str | None:
        """The refusal a request of ``count`` images would get now for want of room (None:
        it would be admitted, or refused only for its deadline). Counts nothing."""
        if not self.policy.enabled:
            return None
        with self._lock:
            return self._full(count)

    def _full(self, count: int) -> str | None:  # under the lock, policy enabled
        limit = self.limit
        if (self._admitted and self._admitted + count > limit) or self._waiters:
            return self._full_message(limit)
        return None

    async def admit(self, deadline: float | None = None, key: object = None) -> None:
        """Admit one request, waiting while the model is full; ``key`` names the stream
        it belongs to (freed slots go round-robin over the streams waiting)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self.policy.enabled or (not self._waiters and self._admitted < self.limit):
                self._admitted += 1
                return
            waiter = _Waiter(loop, loop.create_future())
            self._waiters.setdefault(key, deque()).append(waiter)
        try:
            await waiter.future  # ``release`` handed its slot over: already counted
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    queue = self._waiters[key]
                    queue.remove(waiter)
                    if not queue:
                        del self._waiters[key]
            if granted:
                self.release()
            raise

    def release(self, count: int = 1) -> None:
        """A request admitted earlier is answered: its slots (``count``, as admitted) go
        to the next waiters."""
        for _ in range(count):
            self._release_one()

    def _release_one(self) -> None:
        with self._lock:
            if self._waiters and self._admitted <= self.limit:
                key = next(iter(self._waiters))
                queue = self._waiters.pop(key)
                waiter = queue.popleft()
                if queue:
                    self._waiters[key] = queue  # back of the line
                waiter.granted = True
                waiter.loop.call_soon_threadsafe(_grant, waiter.future)
            else:
                self._admitted -= 1  # (a slot handed to a waiter leaves the count as is)
            self.served.answered(self._admitted)

    def _deadline_check(self, deadline: float | None, count: int = 1) -> tuple[str | None, str]:
        capacity = self.capacity
        if deadline is None or capacity is None or self._admitted == 0:
            return None, ""
        expected = (self._admitted + count) / capacity
        left = deadline - time.monotonic()
        if expected <= left:
            return None, ""
        return "deadline", (
            f"{self.name}: the request's deadline ({left * 1e3:.0f} ms left) cannot be met: "
            f"{self._admitted} requests are ahead of it, about {expected * 1e3:.0f} ms of work "
            f"at {capacity:.0f} images/s; retry later or with a longer deadline"
        )

    def _full_message(self, limit: int) -> str:
        return (
            f"{self.name}: {limit} requests are already queued or running, the model's "
            f"admission limit ({self._limit_source(limit)}); retry later or on another replica"
        )

    def _limit_source(self, limit: int) -> str:
        """What set ``limit``, in the words an operator configures it with."""
        capacity = self.capacity
        if limit == self.policy.max_admitted:
            return "--max-admitted"
        if limit == self._ceiling:
            return "the model's max_queue_size"
        if capacity is None or limit == self._floor:
            return "two batches of max_batch_size per instance"
        return f"{capacity:.0f} requests/s x --admission-wait-ms {self.policy.wait_s * 1e3:.0f}"

    def shed(self, reason: str) -> None:
        """Count a request refused before any work was spent on it."""
        if self._observer is not None:
            self._observer.on_shed(reason)


class _Waiter:
    """A stream item waiting for a slot; ``granted`` once ``release`` gave it one."""

    __slots__ = ("loop", "future", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        self.loop, self.future, self.granted = loop, future, False


def _grant(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
