"""Pipelined bidirectional streams: many requests in flight, answers in request order.

A reader thread takes requests off the stream as they arrive and *begins* each one
(decode, validate, submit to the batcher), so one stream feeds the dynamic batcher
with up to ``window`` requests at once; the RPC thread *ends* them (waits for the
result, encodes the answer) in the order they came. Requests are read even while the
client waits for an answer, so lock-step clients work too. With ``weight``, a message
counts as that many requests against the window (a message carrying several requests),
capped at the window so one large message still goes through alone.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Begun = TypeVar("Begun")
Response = TypeVar("Response")


class _End:
    """Queue item: the request stream is over (or failed)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def __repr__(self) -> str:
        return "END"


class Pipeline(Generic[Request, Begun, Response]):
    """``begin``/``end``/``discard`` never raise for a bad request: they answer in-band."""

    def __init__(
        self,
        begin: Callable[[Request], Begun],
        end: Callable[[Begun], Response],
        discard: Callable[[Begun], None],
        window: int,
        weight: Callable[[Request], int] | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._begin, self._end, self._discard = begin, end, discard
        self._window_size = window
        self._weight = weight
        self._window = threading.Semaphore(window)
        self._items: queue.Queue[tuple[Begun, int] | _End] = queue.Queue()
        self._closed = threading.Event()

    def run(self, requests: Iterator[Request]) -> Iterator[Response]:
        reader = threading.Thread(
            target=self._read, args=(requests,), daemon=True, name="stream-reader"
        )
        reader.start()
        try:
            while True:
                item = self._items.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                begun, permits = item
                try:
                    yield self._end(begun)
                finally:
                    self._window.release(permits)
        finally:
            self._close()

    def _read(self, requests: Iterator[Request]) -> None:
        try:
            for request in requests:
                permits = self._permits(request)
                for _ in range(permits):
                    while not self._window.acquire(timeout=0.1):
                        if self._closed.is_set():
                            return
                if self._closed.is_set():
                    return
                self._items.put((self._begin(request), permits))
        except Exception as exc:  # noqa: BLE001 - the stream broke (cancelled, bad message)
            self._items.put(_End(exc))
            return
        self._items.put(_End())

    def _permits(self, request: Request) -> int:
        if self._weight is None:
            return 1
        return max(1, min(self._weight(request), self._window_size))

    def _close(self) -> None:
        """The RPC ended (maybe cancelled): release whatever was begun and not ended."""
        self._closed.set()
        while True:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                return
            if not isinstance(item, _End):
                self._discard(item[0])
