"""One tiled image in flight: its tiles go through the model's batcher in waves.

``TiledRun`` submits at most ``wave`` tiles of an image at a time; each finished tile is
pasted into the image-sized mask and the next tile is cut, normalised and submitted, so
memory stays bounded (one image, one mask, ``wave`` tile tensors) however large the
image. Tiles are ordinary batcher requests of one row: they batch with tiles of other
images and with small requests, which keep their place in the queue (no head-of-line
blocking). ``future`` resolves to ``{mask_output: mask[None]}`` (the whole image's mask,
one row, like a bucket-sized request's outputs), or fails with the first tile's error.
Cancelling ``future`` (the caller's deadline, or a cancelled RPC) drops the tiles not yet
run; every tile carries the request's deadline. A full queue delays the next tile (it is
retried as tiles finish, or shortly); the request's deadline bounds that wait.

A finished tile is pasted in the batcher's thread (a copy); cutting and normalising the
next tile runs in a small shared pool (``PREPARE_THREADS``), so that the batcher's thread
goes straight back to the backend.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from visionserve.server.errors import ResourceExhausted
from visionserve.server.tiling import TilePlan, cut_tile, paste

log = logging.getLogger(__name__)

RETRY_S = 0.005  # a full queue and no tile of this image in flight: try again after this
PREPARE_THREADS = max(1, (os.cpu_count() or 2) // 2)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _prepare_pool() -> ThreadPoolExecutor:
    """The shared pool that cuts and normalises tiles (created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="visionserve-tiles")
        return _pool

Submit = Callable[[np.ndarray, "float | None"], Future]


class TiledRun:
    """The tiles of one image, submitted ``wave`` at a time; ``future`` gives the mask."""

    def __init__(
        self,
        image: np.ndarray,
        plan: TilePlan,
        *,
        submit: Submit,
        prepare: Callable[[np.ndarray], np.ndarray],
        tile_mask: Callable[[dict[str, np.ndarray]], np.ndarray],
        output: str,
        deadline: float | None,
        wave: int,
    ) -> None:
        self.future: Future = Future()  # left pending, so that the caller can cancel it
        self._image, self._plan = image, plan
        self._submit, self._prepare, self._tile_mask = submit, prepare, tile_mask
        self._output, self._deadline = output, deadline
        self._wave = max(1, wave)
        self._canvas = np.zeros((plan.height, plan.width), np.uint8)
        self._origins = list(plan.origins())
        self._next = 0
        self._done = 0
        self._running: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.future.add_done_callback(self._on_cancel)
        self._fill()

    def _fill(self) -> None:
        """Submit tiles until ``wave`` are in flight or none is left."""
        while True:
            with self._lock:
                if self.future.done() or self._next >= len(self._origins):
                    return
                if len(self._running) >= self._wave:
                    return
                index = self._next
                self._next += 1
            y, x = self._origins[index]
            try:
                tile = self._submit(self._prepare(cut_tile(self._image, self._plan, y, x)), self._deadline)
            except ResourceExhausted:
                with self._lock:
                    self._next -= 1  # taken again later; the queue is full now
                    idle = not self._running
                if idle:
                    threading.Timer(RETRY_S, self._fill).start()
                return
            except Exception as exc:  # noqa: BLE001 - the request fails with it
                self._fail(exc)
                return
            with self._lock:
                self._running[index] = tile
            tile.add_done_callback(lambda f, i=index: self._on_tile(i, f))

    def _on_tile(self, index: int, tile: Future) -> None:
        with self._lock:
            self._running.pop(index, None)
        if self.future.done():
            return
        if tile.cancelled():
            self._fail(ResourceExhausted("a tile of the image was dropped before it ran"))
            return
        error = tile.exception()
        if error is not None:
            self._fail(error)
            return
        try:
            paste(self._canvas, self._tile_mask(tile.result()), self._plan, index)
        except Exception as exc:  # noqa: BLE001 - the request fails with it
            self._fail(exc)
            return
        with self._lock:
            self._done += 1
            finished = self._done == len(self._origins)
        if finished:
            self._resolve()
        else:
            _prepare_pool().submit(self._fill)

    def _resolve(self) -> None:
        try:
            self.future.set_result({self._output: self._canvas[None]})
        except Exception:  # noqa: BLE001 - cancelled meanwhile
            pass

    def _fail(self, error: BaseException) -> None:
        try:
            self.future.set_exception(error)
        except Exception:  # noqa: BLE001 - already resolved or cancelled
            return
        self._drop()

    def _on_cancel(self, future: Future) -> None:
        if future.cancelled():
            self._drop()

    def _drop(self) -> None:
        """Cancel the tiles still queued; no more are submitted."""
        with self._lock:
            running = list(self._running.values())
            self._next = len(self._origins)
        for tile in running:
            tile.cancel()

    @property
    def submitted(self) -> int:
        """Tiles submitted so far (for tests and logs)."""
        return self._next
