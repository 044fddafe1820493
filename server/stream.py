"""Pipelined bidirectional streams as coroutines: many requests in flight, answers in order.

``pipeline(requests, handle, window)`` reads requests as they arrive and starts
``handle(request)`` for each as an asyncio task, so one stream feeds the dynamic batcher
with up to ``window`` requests at once; answers are yielded in request order. Requests
are read even while the client waits for an answer, so lock-step clients work too. With
``weight``, a message counts as that many requests against the window (capped at the
window, so one large message still goes through alone). No thread per stream: a stream
costs a reader task and one task per request in flight.

``handle`` never raises for a bad request: it answers in-band. When the call ends
(finished, cancelled, failed), tasks still running are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


class _End:
    """Queue item: the request stream is over (or failed with ``error``)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def __repr__(self) -> str:
        return "END"


class _Window:
    """A counting window a single reader takes ``n`` permits from at once."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._changed = asyncio.Event()

    async def take(self, n: int) -> None:
        while self._free < n:
            self._changed.clear()
            await self._changed.wait()
        self._free -= n

    def give(self, n: int) -> None:
        self._free += n
        self._changed.set()


async def pipeline(
    requests: AsyncIterator[Request],
    handle: Callable[[Request], Awaitable[Response]],
    window: int,
    weight: Callable[[Request], int] | None = None,
) -> AsyncIterator[Response]:
    """Answers to ``requests`` in order, up to ``window`` (weighted) handled at once."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    slots = _Window(window)
    items: asyncio.Queue[tuple[asyncio.Future, int] | _End] = asyncio.Queue()

    async def read() -> None:
        try:
            async for request in requests:
                permits = 1 if weight is None else max(1, min(weight(request), window))
                await slots.take(permits)
                items.put_nowait((asyncio.ensure_future(handle(request)), permits))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream broke (cancelled, bad message)
            items.put_nowait(_End(exc))
            return
        items.put_nowait(_End())

    reader = asyncio.ensure_future(read())
    try:
        while True:
            item = await items.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            task, permits = item
            try:
                yield await task
            finally:
                slots.give(permits)
    finally:
        reader.cancel()
        while not items.empty():
            left = items.get_nowait()
            if not isinstance(left, _End):
                left[0].cancel()
