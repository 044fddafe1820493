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
killed) puts its unanswered requests back in the queue and reopens with backoff; so
does a stream whose requests are answered UNAVAILABLE in-band (the server drains: it
sends nothing more and half-closes, so the drain need not wait for it). A
stream the server refuses with RESOURCE_EXHAUSTED (its ``--max-streams`` limit) puts its
requests back too and its worker retires while another worker runs; the last one backs
off and retries. A request answered RESOURCE_EXHAUSTED in-band goes back in the queue
after a backoff, at most ``MAX_REFUSALS`` times, then fails with the server's reason.
A stream ended because a message was over the server's (or this client's) message size
limit is no full server (gRPC's text tells them apart): each request too large alone
fails with its size, the limit and the fix, the others go back in the queue, and from
then on messages pack at most that limit's bytes; an answer too large makes messages
carry fewer requests, or fails its image if it answered one (``_packing.py``).
When no answer has come for ``give_up_after`` seconds the run stops with
:class:`BatchStopped`. Per-image failures are collected, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from visionserve.clients._aio import AsyncVisionClient
from visionserve.clients._batch_settings import (
    BACKOFF_S,
    CONNECTION_LOST,
    MAX_ODD_FAILURES,
    MAX_REFUSALS,
    PREPARE_CHUNK,
    REFUSED_BACKOFF_S,
    SERVER_FULL,
    SERVER_GONE,
    STREAM_DEADLINE_S,
    WATCH_S,
    BatchSettings,
    BatchStopped,
    Prepared,
)
from visionserve.clients._errors import (
    MessageTooLarge,
    VisionServeError,
    message_too_large,
    translate,
)
from visionserve.clients._journal import Journal
from visionserve.clients._packing import Packing, message_size
from visionserve.clients._render import decode_index_mask
from visionserve.clients._results import Job, served_record, write_outputs
from visionserve.protos import visionserve_pb2 as pb

log = logging.getLogger(__name__)


class _Done:
    """Queue sentinel: every job is resolved, close the stream."""


DONE = _Done()


@dataclass
class _StreamState:
    window: asyncio.Semaphore
    batched: bool  # SegmentBatches (several requests per message), else SegmentStream
    # key -> (request, when sent, requests in its message), in the order sent
    outstanding: dict[str, tuple[Prepared, float, int]] = field(default_factory=dict)
    expired: bool = False  # the watchdog cancelled the call: a request passed its deadline
    closing: VisionServeError | None = None  # the server drains: send nothing more
    limit: int | None = None  # the message size limit known when the stream opened
    writing: bool = False  # a write is under way (or failed): see MAX_ODD_FAILURES
    answered: int = 0


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
        self._workers = settings.streams  # stream workers still running
        self._batched = settings.per_message > 1  # until the server says UNIMPLEMENTED
        self._last_answer = time.monotonic()
        self._last_error: VisionServeError | None = None  # why the latest stream broke
        self._refusals: dict[str, int] = {}  # key -> RESOURCE_EXHAUSTED answers so far
        self._packing = Packing(settings.per_message)  # what messages over a limit taught
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
                last = f"; last error: {self._last_error}" if self._last_error else ""
                raise BatchStopped(
                    f"no answer from {self.client.config.target} for {silent:.0f}s "
                    f"(--give-up-after {limit:g}{last}); rerun to continue where this run "
                    f"stopped"
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
        delay, odd = BACKOFF_S[0], 0
        while self._remaining > 0:
            state = _StreamState(asyncio.Semaphore(self.settings.window), self._batched)
            state.limit = self._packing.limit
            error = await self._one_stream(state)
            if error is None or self._remaining == 0:
                return
            if message_too_large(error) is not None:
                continue  # the culprits failed, the rest is queued to fit: reopened at once
            masked = error.code == grpc.StatusCode.INTERNAL and state.writing
            if not masked:
                self._last_error = error
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                continue  # reopened as SegmentStream at once
            if error.code == SERVER_FULL and self._workers > 1:
                self._workers -= 1  # its requests are back in the queue for the others
                log.info(
                    "stream %d refused: the server limits streams; going on with %d (%s)",
                    number,
                    self._workers,
                    error.details,
                )
                return
            if state.answered:
                delay, odd = BACKOFF_S[0], 0
            odd += error.code in CONNECTION_LOST and not masked
            if odd >= MAX_ODD_FAILURES:
                raise BatchStopped(f"the server ended the stream {odd} times in a row: {error}")
            why = "ended by the server as it was written to (status lost)" if masked else error
            log.info("stream %d: %s; reopening in %.1fs", number, why, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _one_stream(self, state: _StreamState) -> VisionServeError | None:
        """One stream call until DONE (returns None) or it breaks (returns the error)."""
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
            return state.closing  # None: every job is done
        except (grpc.RpcError, VisionServeError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and (
                _task_cancelled() or not state.expired
            ):
                raise  # the run itself is being stopped (Ctrl-C): never swallowed
            return self._broken(state, exc)
        finally:
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
        error = translate(exc)
        too_large = message_too_large(error)
        if too_large is not None:
            self._over_limit(state, too_large, error)
            return error
        for prepared, _, _ in state.outstanding.values():  # not lost: sent again
            self._queue.put_nowait(prepared)
        if error.code == grpc.StatusCode.UNIMPLEMENTED and state.batched:
            if self._batched:  # every stream finds out; say it once
                log.info(
                    "%s has no SegmentBatches (an older server): one image per message",
                    self.client.config.target,
                )
                self._batched = False
            return error
        if error.code not in SERVER_GONE | CONNECTION_LOST | {SERVER_FULL}:
            raise BatchStopped(f"the server ended the stream: {error}") from exc
        return error

    def _over_limit(
        self, state: _StreamState, too_large: MessageTooLarge, error: VisionServeError
    ) -> None:
        """A stream ended by a message over a size limit. A request: those too large alone
        fail, later messages pack at most the limit's bytes. An answer (answers come in
        order: the oldest message's): its request fails if it was alone, else later
        messages pack fewer requests. The rest go back in the queue."""
        outstanding = list(state.outstanding.values())
        if too_large.request and self._packing.learn(too_large, state.limit, error):
            outstanding = [e for e in outstanding if not self._refused_as_too_large(e[0], state)]
        elif not too_large.request and outstanding:
            prepared, _, together = outstanding[0]
            if together == 1:
                reason = VisionServeError(error.code, too_large.reason())
                self._fail_found(prepared, reason)
                outstanding = outstanding[1:]
            else:
                self._packing.fewer(together, too_large, error)
        else:  # over a limit known when it was sent (sizes misjudged), or no culprit
            raise BatchStopped(f"the server ended the stream: {error}")
        for prepared, _, _ in outstanding:
            self._queue.put_nowait(prepared)

    def _refused_as_too_large(self, prepared: Prepared, state: _StreamState) -> bool:
        """Fail ``prepared`` when a message with it alone is over the message limit learnt."""
        reason = self._packing.over(prepared.request, state.batched)
        if reason is not None:
            self._fail_found(prepared, reason)
        return reason is not None

    def _fail_found(self, prepared: Prepared, reason: VisionServeError) -> None:
        self._last_answer = time.monotonic()  # a failure, found out: progress
        self._resolve(prepared.job.key, str(reason))

    async def _send(self, call: grpc.aio.StreamStreamCall, state: _StreamState) -> None:
        try:
            while True:
                items = await self._take(state)
                if not items:
                    await call.done_writing()
                    return
                now = time.monotonic()
                for item in items:
                    state.outstanding[item.job.key] = (item, now, len(items))
                state.writing = True
                if state.batched:
                    await call.write(pb.SegmentBatch(requests=[i.request for i in items]))
                else:
                    await call.write(items[0].request)
                state.writing = False
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            log.debug("stream write failed: %s", exc)  # the reader sees the same failure

    async def _take(self, state: _StreamState) -> list[Prepared]:
        """The next message's requests: waits for one, then takes what is ready without
        waiting (up to ``per_message``, within the window and the message size limit
        learnt); [] when every job is done. Requests over that limit alone fail here."""
        limit = self._packing.per_message if state.batched else 1
        await state.window.acquire()
        item: Prepared | _Done | None = None
        while item is None:
            if state.closing:
                return []
            item = await self._queue.get()
            if isinstance(item, _Done):
                return []
            if state.closing:  # while we waited: for another stream
                self._queue.put_nowait(item)
                return []
            if self._refused_as_too_large(item, state):
                item = None
        items, size = [item], message_size(item.request, state.batched)
        while len(items) < limit and not self._queue.empty() and not state.window.locked():
            item = self._queue.get_nowait()
            if isinstance(item, _Done) or not self._packing.fits(size, item.request):
                self._queue.put_nowait(item)  # for the next call; send what we have
                break
            await state.window.acquire()  # free: does not wait
            items.append(item)
            size += message_size(item.request, True)
        return items

    async def _watch(self, call: grpc.aio.StreamStreamCall, state: _StreamState) -> None:
        """Cancel the call when its oldest request passes the per-request deadline."""
        timeout = self.settings.timeout
        while True:
            await asyncio.sleep(min(WATCH_S, timeout / 4))
            if not state.outstanding:
                continue
            oldest = min(t for _, t, _ in state.outstanding.values())
            if time.monotonic() - oldest > timeout:
                state.expired = True
                call.cancel()
                return

    def _answer(self, state: _StreamState, responses: Sequence[pb.SegmentResponse]) -> None:
        """One answer message: failures resolved here, successes finished in one hop."""
        done: list[tuple[Prepared, pb.SegmentResponse]] = []
        for response in responses:
            entry = state.outstanding.pop(response.request_id, None)
            if entry is None:
                log.warning("answer for an unknown request_id %r ignored", response.request_id)
                continue
            prepared = entry[0]
            state.window.release()
            state.answered += 1
            if not response.error_code:
                self._last_answer = time.monotonic()
                done.append((prepared, response))
                continue
            error = VisionServeError.from_status(response.error_code, response.error_message)
            failed = self._retry_in_band(state, prepared, error)
            if failed is not None:  # a request sent again is no progress (--give-up-after)
                self._last_answer = time.monotonic()
                self._resolve(prepared.job.key, str(failed))
        if not done:
            return
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._finish_all, done)
        self._pending.add(future)
        keys = [prepared.job.key for prepared, _ in done]
        future.add_done_callback(lambda f: self._finished(keys, f))

    def _retry_in_band(
        self, state: _StreamState, prepared: Prepared, error: VisionServeError
    ) -> VisionServeError | None:
        """An in-band error: None when the request is sent again, else why it failed.

        UNAVAILABLE (the server drains): sent again shortly, and this stream sends nothing
        more, half-closes (so the drain need not wait for it) and is reopened with backoff.
        RESOURCE_EXHAUSTED: sent again after a backoff, at most MAX_REFUSALS times."""
        key, later = prepared.job.key, asyncio.get_running_loop().call_later
        if error.code == grpc.StatusCode.UNAVAILABLE:
            state.closing = state.closing or error
            later(0.2, self._queue.put_nowait, prepared)
            return None
        if error.code != SERVER_FULL:
            return error
        refusals = self._refusals.get(key, 0)
        if refusals == MAX_REFUSALS:
            details = f"{error.details} (answered {error.code.name} {refusals + 1} times)"
            return VisionServeError(error.code, details)
        self._refusals[key] = refusals + 1
        later(REFUSED_BACKOFF_S * 2**refusals, self._queue.put_nowait, prepared)
        return None

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
        truth, check = prepared.truth, s.server_iou
        mask, record = served_record(job, truth, response, s.num_classes, s.ignore_index, check)
        write_outputs(job, mask, record, s.out_root, prepared.request.image.encoded)
        self.journal.append(record)


def _task_cancelled() -> bool:
    """True when the current task itself was cancelled (not only the stream call under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
