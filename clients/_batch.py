"""Batch segmentation over SegmentBatches: many in flight, nothing lost, nothing twice.

``BatchRunner.run(jobs)`` reads files in worker threads (a few per hop), sends them
over ``streams`` parallel SegmentBatches calls (up to ``per_message`` requests per
message, whatever is ready; SegmentStream, one per message, with ``per_message`` 1 or a
server without SegmentBatches) with up to ``window`` requests in flight on each, and
hands each answer message to a worker thread that checks every answer, scores it,
writes the mask (and overlay) atomically and appends the image to the journal. The ground
truth is read and decoded once, when the image is read; the client's confusion matrix
is what the report is built from, so the ground truth goes to the server only with
``server_iou`` (the server then decodes and scores it too, and the counts are
cross-checked). A stream that fails with UNAVAILABLE (server restarting, draining,
killed) puts its unanswered requests back in the queue and reopens with backoff; when
no answer has come for ``give_up_after`` seconds the run stops with
:class:`BatchStopped`. Per-image failures are collected, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from visionserve.clients._aio import AsyncVisionClient
from visionserve.clients._dataset_iou import iou_from_confusion
from visionserve.clients._errors import VisionServeError, translate
from visionserve.clients._journal import Journal
from visionserve.clients._render import decode_index_mask
from visionserve.clients._results import Job, build_record, served_fields, write_outputs
from visionserve.clients._types import decode_mask
from visionserve.protos import visionserve_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    """What to ask the server and how hard to push it."""

    model: str
    version: str
    num_classes: int
    ignore_index: int
    send_ignore_index: bool = False
    server_iou: bool = False
    streams: int = 4
    window: int = 16
    per_message: int = 8
    timeout: float = 60.0
    give_up_after: float = 60.0
    threads: int = 2
    out_root: Path = Path(".")

    def __post_init__(self) -> None:
        for name in ("streams", "window", "per_message", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.timeout <= 0 or self.give_up_after <= 0:
            raise ValueError(
                f"timeout and give_up_after must be > 0 s, got {self.timeout}, {self.give_up_after}"
            )


@dataclass(frozen=True)
class Prepared:
    """A job with its request built (file bytes read) and its ground truth decoded."""

    job: Job
    request: pb.SegmentRequest
    truth: np.ndarray | None


# Each stream carries a deadline (servers may not cope with none); a stream that reaches
# it is simply reopened, its unanswered requests sent again. Per-request deadlines are
# the client's watchdog (``BatchSettings.timeout``).
STREAM_DEADLINE_S = 3600.0
# A thread-per-stream server runs only as many streams at once as it has threads; a
# stream that has had no answer while the server is seen serving others is waiting for a
# thread: it is cancelled, its requests go to the others, and it retires. "Seen serving
# others", over a patience of STALL_S or twice the slowest answer seen so far, whichever
# is longer: a request sent that long after this stream's oldest was answered first (the
# server's queue is first come, first served), or no answer came for that long while the
# streams that were answered had nothing in flight (the rest may be waiting too).
# Waiting alone is no sign: with a slow model, 64 requests in flight ahead of a stream's
# first take a while; and a served stream is idle for a moment between its answer and
# its next message.
STALL_S = 2.0
WATCH_S = 0.25  # how often a stream's watchdog looks


# Stream-level failures after which the stream is reopened and its unanswered requests
# sent again: UNAVAILABLE (server restarting, draining, unreachable) and a client-side
# deadline; also the codes a connection lost mid-message surfaces as (INTERNAL "Internal
# error from Core", UNKNOWN "Stream removed", CANCELLED), but those at most
# MAX_ODD_FAILURES times in a row without an answer, so a real server bug stops the run.
SERVER_GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CONNECTION_LOST = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
MAX_ODD_FAILURES = 3
# Files read per worker-thread hop: each hop costs two event-loop wake-ups.
PREPARE_CHUNK = 8


class BatchStopped(Exception):
    """The run stopped before every image was tried (the server is gone, or refused us)."""


class _Done:
    """Queue sentinel: every job is resolved, close the stream."""


DONE = _Done()


@dataclass(eq=False)  # hashed by identity: the runner keeps a set of the open ones
class _StreamState:
    window: asyncio.Semaphore
    batched: bool  # SegmentBatches (several requests per message), else SegmentStream
    outstanding: dict[str, tuple[Prepared, float]] = field(default_factory=dict)
    expired: bool = False
    stalled: bool = False
    answered: int = 0
    opened: float = field(default_factory=time.monotonic)


class BatchRunner:
    """Runs jobs through a server; ``failures`` maps key -> reason afterwards."""

    def __init__(
        self,
        client: AsyncVisionClient,
        settings: BatchSettings,
        journal: Journal,
        on_resolved: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.journal = journal
        self.on_resolved = on_resolved or (lambda ok: None)
        self.failures: dict[str, str] = {}
        self.done = 0
        self._remaining = 0
        self._active_streams = settings.streams
        self._batched = settings.per_message > 1  # until the server says UNIMPLEMENTED
        self._last_answer = time.monotonic()
        self._newest_answered_sent = 0.0  # send time of the newest request answered
        self._slowest_answer = 0.0  # the longest a request waited for its answer
        self._states: set[_StreamState] = set()  # the open streams
        self._pending: set[asyncio.Future[Any]] = set()

    async def run(self, jobs: list[Job]) -> None:
        """Process every job; raises BatchStopped (after in-flight writes finish) if it cannot."""
        self._remaining = len(jobs)
        if not jobs:
            return
        s = self.settings
        self._queue: asyncio.Queue[Prepared | _Done] = asyncio.Queue()
        self._slots = asyncio.Semaphore(2 * s.streams * s.window)
        with ThreadPoolExecutor(s.threads, thread_name_prefix="segment-io") as pool:
            self._pool = pool
            self._last_answer = time.monotonic()
            tasks = [asyncio.create_task(self._feed(jobs))]
            tasks += [asyncio.create_task(self._stream_worker(i)) for i in range(s.streams)]
            work = asyncio.gather(*tasks)
            watchdog = asyncio.create_task(self._give_up())
            tasks += [watchdog]
            try:
                await asyncio.wait((work, watchdog), return_when=asyncio.FIRST_COMPLETED)
                if watchdog.done():
                    watchdog.result()  # raises BatchStopped
                await work
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(work, *tasks, return_exceptions=True)
                if self._pending:  # let masks being written land in the journal
                    await asyncio.wait(self._pending)

    async def _give_up(self) -> None:
        """Stop the run when no answer has come for ``give_up_after`` seconds, whatever the
        streams are doing (reconnecting, waiting on a window, waiting for a first answer)."""
        limit = self.settings.give_up_after
        while self._remaining > 0:
            silent = time.monotonic() - self._last_answer
            if silent > limit:
                raise BatchStopped(
                    f"no answer from {self.client.config.target} for {silent:.0f}s "
                    f"(--give-up-after {limit:g}); rerun to continue where this run stopped"
                )
            await asyncio.sleep(min(1.0, limit - silent + 0.01))

    # -- bookkeeping ---------------------------------------------------------
    def _resolve(self, key: str, reason: str | None) -> None:
        if reason is None:
            self.done += 1
        else:
            self.failures[key] = reason
            log.debug("%s failed: %s", key, reason)
        self._remaining -= 1
        self._slots.release()
        self.on_resolved(reason is None)
        if self._remaining == 0:
            for _ in range(self.settings.streams):
                self._queue.put_nowait(DONE)

    async def _feed(self, jobs: list[Job]) -> None:
        """Read files ``PREPARE_CHUNK`` at a time in a worker thread (one hop, not one per file)."""
        loop = asyncio.get_running_loop()
        start = 0
        while start < len(jobs):
            await self._slots.acquire()  # at least one free slot, then those free now:
            taken = 1  # never wait for more than one (a small pool would never fill a chunk)
            while taken < min(PREPARE_CHUNK, len(jobs) - start) and not self._slots.locked():
                await self._slots.acquire()
                taken += 1
            chunk, start = jobs[start : start + taken], start + taken
            prepared = await loop.run_in_executor(self._pool, self._prepare_all, chunk)
            for job, item in zip(chunk, prepared):
                if isinstance(item, str):
                    self._resolve(job.key, item)
                else:
                    self._queue.put_nowait(item)

    def _prepare_all(self, jobs: list[Job]) -> list[Prepared | str]:
        """Each job prepared, or why its files cannot be read."""
        done: list[Prepared | str] = []
        for job in jobs:
            try:
                done.append(self._prepare(job))
            except (OSError, ValueError) as exc:
                done.append(f"cannot read the file: {exc}")
        return done

    def _prepare(self, job: Job) -> Prepared:
        s = self.settings
        request = pb.SegmentRequest(
            model=s.model, version=s.version, request_id=job.key, mask_format=pb.MASK_FORMAT_RAW
        )
        request.image.encoded = job.image.read_bytes()
        truth = None
        if job.gt is not None:
            gt_bytes = job.gt.read_bytes()
            try:
                truth = decode_index_mask(gt_bytes)
            except ValueError as exc:
                raise ValueError(f"{job.gt}: {exc}") from exc
            if s.server_iou:  # the PNG as it is: the server decodes and scores it too
                request.ground_truth.data = gt_bytes
                request.ground_truth.format = pb.MASK_FORMAT_PNG
                if s.send_ignore_index:
                    request.ignore_index = s.ignore_index
        return Prepared(job, request, truth)

    # -- streams -------------------------------------------------------------
    async def _stream_worker(self, number: int) -> None:
        delay, odd = 0.1, 0
        while self._remaining > 0:
            state = _StreamState(asyncio.Semaphore(self.settings.window), self._batched)
            error = await self._one_stream(state)
            if error is None or self._remaining == 0:
                return
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                continue  # reopened as SegmentStream at once
            if state.stalled:
                self._active_streams -= 1
                log.info(
                    "stream %d was not served while others were (server threads busy?): "
                    "going on with %d stream(s)",
                    number,
                    self._active_streams,
                )
                return
            if state.answered:
                delay, odd = 0.1, 0
            odd += error.code in CONNECTION_LOST
            if odd >= MAX_ODD_FAILURES:
                raise BatchStopped(f"the server ended the stream {odd} times in a row: {error}")
            log.info("stream %d: %s; reopening in %.1fs", number, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _one_stream(self, state: _StreamState) -> VisionServeError | None:
        """One stream call until DONE (returns None) or it breaks (returns the error)."""
        self._states.add(state)
        if state.batched:
            call = self.client.open_segment_batches(timeout=STREAM_DEADLINE_S)
        else:
            call = self.client.open_segment_stream(timeout=STREAM_DEADLINE_S)
        sender = asyncio.create_task(self._send(call, state))
        watchdog = asyncio.create_task(self._watch(call, state))
        try:
            async for message in call:
                self._answer(state, message.responses if state.batched else (message,))
            if state.outstanding:
                raise VisionServeError(
                    grpc.StatusCode.UNAVAILABLE, "the server closed the stream early"
                )
            return None
        except (grpc.RpcError, VisionServeError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and (
                _task_cancelled() or not (state.expired or state.stalled)
            ):
                raise  # the run itself is being stopped (Ctrl-C): never swallowed
            return self._broken(state, exc)
        finally:
            self._states.discard(state)
            sender.cancel()
            watchdog.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)

    def _broken(self, state: _StreamState, exc: BaseException) -> VisionServeError:
        if state.expired:
            error = VisionServeError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.settings.timeout:.0f}s"
            )
            for key in list(state.outstanding):
                self._resolve(key, str(error))
            return error
        for prepared, _ in state.outstanding.values():  # not lost: sent again
            self._queue.put_nowait(prepared)
        if state.stalled:
            return VisionServeError(grpc.StatusCode.CANCELLED, "stream not served")
        error = translate(exc)
        if error.code == grpc.StatusCode.UNIMPLEMENTED and state.batched:
            if self._batched:  # every stream finds out; say it once
                log.info(
                    "%s has no SegmentBatches (an older server): one image per message",
                    self.client.config.target,
                )
                self._batched = False
            return error
        if error.code not in SERVER_GONE | CONNECTION_LOST:
            raise BatchStopped(f"the server ended the stream: {error}") from exc
        return error

    async def _send(self, call: grpc.aio.StreamStreamCall, state: _StreamState) -> None:
        try:
            while True:
                items = await self._take(state)
                if not items:
                    await call.done_writing()
                    return
                now = time.monotonic()
                for item in items:
                    state.outstanding[item.job.key] = (item, now)
                if state.batched:
                    await call.write(pb.SegmentBatch(requests=[i.request for i in items]))
                else:
                    await call.write(items[0].request)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            log.debug("stream write failed: %s", exc)  # the reader sees the same failure

    async def _take(self, state: _StreamState) -> list[Prepared]:
        """The next message's requests: waits for one, then takes what is ready without
        waiting (up to ``per_message``, within the window); [] when every job is done."""
        limit = self.settings.per_message if state.batched else 1
        await state.window.acquire()
        item = await self._queue.get()
        if isinstance(item, _Done):
            return []
        items = [item]
        while len(items) < limit and not self._queue.empty() and not state.window.locked():
            item = self._queue.get_nowait()
            if isinstance(item, _Done):
                self._queue.put_nowait(item)  # for the next call; send what we have
                break
            await state.window.acquire()  # free: does not wait
            items.append(item)
        return items

    async def _watch(self, call: grpc.aio.StreamStreamCall, state: _StreamState) -> None:
        """Cancel the call when its oldest request passes the deadline, or it is not served."""
        timeout = self.settings.timeout
        while True:
            await asyncio.sleep(min(WATCH_S, timeout / 4))
            if not state.outstanding:
                continue
            oldest = min(t for _, t in state.outstanding.values())
            age = time.monotonic() - oldest
            if state.answered == 0 and self._serving_others(state, oldest):
                state.stalled = True
            elif age > timeout:
                state.expired = True
            else:
                continue
            call.cancel()
            return

    def _serving_others(self, state: _StreamState, oldest: float) -> bool:
        """Whether the server was seen serving other streams while ``state`` waited."""
        if self._active_streams <= 1:
            return False
        patience = max(STALL_S, 2 * self._slowest_answer)
        if time.monotonic() - oldest <= patience:
            return False
        overtaken = self._newest_answered_sent > oldest + patience
        served = [other for other in self._states if other is not state and other.answered]
        others_idle = (
            self._last_answer > state.opened
            and time.monotonic() - self._last_answer > patience
            and not any(other.outstanding for other in served)
        )
        return overtaken or others_idle

    def _answer(self, state: _StreamState, responses: Sequence[pb.SegmentResponse]) -> None:
        """One answer message: failures resolved here, successes finished in one hop."""
        done: list[tuple[Prepared, pb.SegmentResponse]] = []
        for response in responses:
            entry = state.outstanding.pop(response.request_id, None)
            if entry is None:
                log.warning("answer for an unknown request_id %r ignored", response.request_id)
                continue
            prepared, sent = entry
            now = time.monotonic()
            self._newest_answered_sent = max(self._newest_answered_sent, sent)
            self._slowest_answer = max(self._slowest_answer, now - sent)
            state.window.release()
            state.answered += 1
            self._last_answer = now
            if response.error_code == grpc.StatusCode.UNAVAILABLE.value[0]:
                asyncio.get_running_loop().call_later(0.2, self._queue.put_nowait, prepared)
            elif response.error_code:
                error = VisionServeError.from_status(response.error_code, response.error_message)
                self._resolve(prepared.job.key, str(error))
            else:
                done.append((prepared, response))
        if not done:
            return
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._finish_all, done)
        self._pending.add(future)
        keys = [prepared.job.key for prepared, _ in done]
        future.add_done_callback(lambda f: self._finished(keys, f))

    def _finished(self, keys: list[str], future: asyncio.Future[list[str | None]]) -> None:
        self._pending.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        reasons = [f"{type(exc).__name__}: {exc}"] * len(keys) if exc else future.result()
        for key, reason in zip(keys, reasons):
            self._resolve(key, reason)

    def _finish_all(self, done: list[tuple[Prepared, pb.SegmentResponse]]) -> list[str | None]:
        """``_finish`` each; None for a finished image, else why it failed."""
        reasons: list[str | None] = []
        for prepared, response in done:
            try:
                self._finish(prepared, response)
                reasons.append(None)
            except Exception as exc:  # noqa: BLE001 - one image's failure, listed in the report
                reasons.append(f"{type(exc).__name__}: {exc}")
        return reasons

    # -- per image, in a worker thread --------------------------------------
    def _finish(self, prepared: Prepared, response: pb.SegmentResponse) -> None:
        job, s = prepared.job, self.settings
        mask = decode_mask(response.mask)
        record = build_record(job, mask, prepared.truth, s.num_classes, s.ignore_index)
        if response.HasField("serving"):  # how the server served it (older servers: absent)
            served = response.serving
            record.update(served_fields(served.mode, served.description, served.scale))
        if s.server_iou and prepared.truth is not None:
            check_server_iou(record["confusion"], response)
            record["server_checked"] = True  # the report claims the cross-check for these
        write_outputs(job, mask, record, s.out_root, prepared.request.image.encoded)
        self.journal.append(record)


def check_server_iou(confusion: list[list[int]], response: pb.SegmentResponse) -> None:
    """The server's per-class counts must be those of the returned mask's confusion matrix."""
    intersection, union, _ = iou_from_confusion(np.asarray(confusion))
    server_i = [int(c.intersection) for c in response.iou.classes]
    server_u = [int(c.union) for c in response.iou.classes]
    if server_i != intersection.tolist() or server_u != union.tolist():
        raise ValueError(
            f"the server's IoU counts (intersection {server_i}, union {server_u}) disagree with "
            f"the confusion matrix of the returned mask (intersection {intersection.tolist()}, "
            f"union {union.tolist()})"
        )


def _task_cancelled() -> bool:
    """True when the current task itself was cancelled (not only the stream call under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
