"""The dynamic batcher: pure collation, then real worker threads around a recording model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from visionserve.server.batcher import STOP, Batcher, collate, uncollate
from visionserve.server.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)


def rows(n: int, h: int = 2, w: int = 2, value: float = 0.0) -> np.ndarray:
    return np.full((n, 3, h, w), value, np.float32)


# -- collate / uncollate (pure) ----------------------------------------------------------
@pytest.mark.parametrize(
    ("shapes", "max_batch", "expected"),
    [
        ([(1, 2, 2)], 4, [(0,)]),
        ([(1, 2, 2)] * 4, 4, [(0, 1, 2, 3)]),
        ([(1, 2, 2)] * 5, 4, [(0, 1, 2, 3), (4,)]),
        ([(1, 2, 2), (1, 3, 3), (1, 2, 2)], 8, [(0, 2), (1,)]),
        ([(3, 2, 2), (2, 2, 2), (1, 2, 2)], 4, [(0,), (1, 2)]),  # requests are never split
        ([(2, 2, 2), (1, 2, 2), (1, 2, 2)], 2, [(0,), (1, 2)]),
        ([(1, 2, 2), (1, 2, 3), (1, 2, 2), (1, 2, 3)], 1, [(0,), (2,), (1,), (3,)]),
    ],
)
def test_collate_groups_by_shape_in_order_within_the_limit(shapes, max_batch, expected) -> None:
    tensors = [np.full((n, 3, h, w), i, np.float32) for i, (n, h, w) in enumerate(shapes)]
    batches = collate(tensors, max_batch)
    assert [b.indices for b in batches] == expected
    for batch in batches:
        assert batch.tensor.shape[0] <= max_batch
        np.testing.assert_array_equal(
            batch.tensor, np.concatenate([tensors[i] for i in batch.indices])
        )


def test_collate_separates_dtypes() -> None:
    batches = collate([rows(1), rows(1).astype(np.float16)], 4)
    assert [b.indices for b in batches] == [(0,), (1,)]


@pytest.mark.parametrize("bad", [np.zeros((0, 3, 2, 2), np.float32), rows(5)])
def test_collate_refuses_empty_or_oversized_requests(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"expected 1\.\.4 rows"):
        collate([rows(1), bad], 4)


@pytest.mark.parametrize(("counts"), [[1], [1, 1, 1], [2, 1, 3]])
def test_uncollate_splits_rows_back(counts: list[int]) -> None:
    total = sum(counts)
    outputs = {"a": np.arange(total), "b": np.arange(total * 2).reshape(total, 2)}
    parts = uncollate(outputs, counts)
    assert [len(p["a"]) for p in parts] == counts
    np.testing.assert_array_equal(np.concatenate([p["b"] for p in parts]), outputs["b"])


def test_uncollate_names_an_output_with_the_wrong_row_count() -> None:
    with pytest.raises(ValueError, match=r"'b' with shape \(2,\) for a batch of 3 rows"):
        uncollate({"a": np.zeros(3), "b": np.zeros(2)}, [1, 2])


def test_the_stop_sentinel_is_named() -> None:
    assert repr(STOP) == "STOP"


# -- the batcher with worker threads -------------------------------------------------------
class Recorder:
    """A model: output = input summed over C,H,W, and the row count of every call."""

    def __init__(self, delay: float = 0.0, fail_when: float | None = None) -> None:
        self.calls: list[int] = []
        self.delay = delay
        self.fail_when = fail_when
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.calls.append(batch.shape[0])
        time.sleep(self.delay)
        if self.fail_when is not None and np.any(batch == self.fail_when):
            raise RuntimeError("poisoned batch")
        return {"sum": batch.reshape(batch.shape[0], -1).sum(axis=1)}


def make(model: Recorder, **kwargs: object) -> Batcher:
    options = {"max_batch_size": 4, "max_queue_delay_s": 0.05, "queue_size": 64, "instances": 1}
    options.update(kwargs)
    return Batcher("m", model, **options)


def test_concurrent_requests_are_batched_and_routed_to_their_caller() -> None:
    model = Recorder(delay=0.02)
    batcher = make(model, max_batch_size=4, max_queue_delay_s=0.2)
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [
                pool.submit(lambda v: batcher.submit(rows(1, value=v)).result(5), float(v))
                for v in range(16)
            ]
            results = [f.result() for f in futures]
    finally:
        batcher.close()
    for value, result in enumerate(results):
        assert result["sum"].tolist() == [value * 12.0]
    assert sum(model.calls) == 16 and max(model.calls) <= 4
    assert len(model.calls) < 16  # real batching happened


def test_a_lone_request_on_an_idle_model_runs_at_once() -> None:
    batcher = make(Recorder(), max_queue_delay_s=2.0, max_batch_size=8)
    try:
        start = time.monotonic()
        batcher.submit(rows(1)).result(5)
        assert time.monotonic() - start < 1.0  # not the 2 s queue delay
    finally:
        batcher.close()


def test_a_busy_model_gathers_requests_for_at_most_the_queue_delay() -> None:
    model = Recorder(delay=0.1)
    batcher = make(model, max_queue_delay_s=0.3, max_batch_size=8)
    try:
        busy = batcher.submit(rows(1))  # runs at once, for 0.1 s
        time.sleep(0.02)
        start = time.monotonic()
        waiting = [batcher.submit(rows(1)) for _ in range(3)]
        for future in waiting:
            future.result(5)
        busy.result(5)
        assert 0.25 <= time.monotonic() - start < 2.0  # gathered up to the delay
        assert model.calls == [1, 3]
    finally:
        batcher.close()


def test_a_failing_batch_fails_its_requests_with_one_status_and_the_worker_lives() -> None:
    model = Recorder(delay=0.05, fail_when=7.0)
    batcher = make(model, max_queue_delay_s=0.1)
    try:
        busy = batcher.submit(rows(1, value=1.0))  # the two below queue behind it
        time.sleep(0.02)
        bad = batcher.submit(rows(1, value=7.0))
        same_batch = batcher.submit(rows(1, value=1.0))
        busy.result(5)
        for future in (bad, same_batch):
            with pytest.raises(BackendError, match="RuntimeError: poisoned batch"):
                future.result(5)
        assert batcher.submit(rows(2, value=1.0)).result(5)["sum"].tolist() == [12.0, 12.0]
    finally:
        batcher.close()


def test_expired_requests_never_reach_the_backend() -> None:
    model = Recorder(delay=0.2)
    batcher = make(model, max_queue_delay_s=0.2)
    try:
        busy = batcher.submit(rows(1))  # runs for 0.2 s: the next one waits behind it
        time.sleep(0.02)
        doomed = batcher.submit(rows(1), deadline=time.monotonic() + 0.05)
        with pytest.raises(DeadlineExceeded, match="did not run"):
            doomed.result(5)
        busy.result(5)
        assert model.calls == [1]
        with pytest.raises(DeadlineExceeded):
            batcher.submit(rows(1), deadline=time.monotonic() - 1)
    finally:
        batcher.close()


def test_cancelled_requests_never_reach_the_backend() -> None:
    model = Recorder(delay=0.1)
    batcher = make(model, max_queue_delay_s=0.2)
    try:
        busy = batcher.submit(rows(1, value=3.0))  # the two below queue behind it
        time.sleep(0.02)
        cancelled = batcher.submit(rows(1, value=1.0))
        kept = batcher.submit(rows(1, value=2.0))
        assert cancelled.cancel()
        assert kept.result(5)["sum"].tolist() == [24.0]
        busy.result(5)
        assert model.calls == [1, 1]
    finally:
        batcher.close()


def test_a_full_queue_is_resource_exhausted_and_tiles_have_a_bound_of_their_own() -> None:
    """Whole requests past the queue are refused; tiles of large images, bounded apart,
    never take a whole request's place."""
    gate = threading.Event()
    batcher = make(
        lambda b: (gate.wait(5), {"sum": np.zeros(len(b))})[1],
        queue_size=2,
        max_batch_size=1,
        max_queue_delay_s=0,
    )
    try:
        running = batcher.submit(rows(1))
        time.sleep(0.1)  # the worker holds it
        tiles = [batcher.submit(rows(1), tile=True) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match=r"tile queue is full \(2 tiles waiting\)"):
            batcher.submit(rows(1), tile=True)
        whole = [batcher.submit(rows(1)), batcher.submit(rows(1))]  # tiles took no place of theirs
        with pytest.raises(ResourceExhausted, match=r"request queue is full \(2 requests waiting\)"):
            batcher.submit(rows(1))
        gate.set()
        for future in [running, *tiles, *whole]:
            future.result(5)
        assert batcher.submit(rows(1), tile=True).result(5) is not None  # room again
    finally:
        gate.set()
        batcher.close()


def test_close_drains_accepted_requests_then_refuses() -> None:
    model = Recorder(delay=0.05)
    batcher = make(model, max_batch_size=2, max_queue_delay_s=0.0, instances=2)
    futures = [batcher.submit(rows(1, value=1.0)) for _ in range(10)]
    batcher.close()
    assert all(f.result(0)["sum"].tolist() == [12.0] for f in futures)
    with pytest.raises(Unavailable, match="shutting down"):
        batcher.submit(rows(1))


def test_instances_run_batches_in_parallel() -> None:
    model = Recorder(delay=0.2)
    batcher = make(model, max_batch_size=1, max_queue_delay_s=0.0, instances=4)
    try:
        start = time.monotonic()
        futures = [batcher.submit(rows(1)) for _ in range(4)]
        for future in futures:
            future.result(5)
        assert time.monotonic() - start < 0.6  # 4 x 0.2 s serially
    finally:
        batcher.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
        ({"max_queue_delay_s": -1}, "max_queue_delay must be >= 0"),
        ({"queue_size": 0}, "queue_size and instances must be at least 1"),
        ({"instances": 0}, "queue_size and instances must be at least 1"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(Recorder(), **kwargs)


def test_requests_with_too_many_rows_are_invalid() -> None:
    batcher = make(Recorder(), max_batch_size=2)
    try:
        with pytest.raises(InvalidArgument, match=r"expected 1\.\.2 \(max_batch_size\)"):
            batcher.submit(rows(3))
    finally:
        batcher.close()


# -- running in the caller's thread, and handing results out late -------------------------
class ThreadRecorder(Recorder):
    """A Recorder that also notes which thread ran each batch."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay)
        self.threads: list[str] = []

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.threads.append(threading.current_thread().name)
        return super().__call__(batch)


def test_an_inline_request_on_an_idle_model_runs_in_the_callers_thread() -> None:
    model = ThreadRecorder()
    batcher = make(model, max_queue_delay_s=0.0)
    try:
        future = batcher.submit(rows(1, value=2.0), inline=True)
        assert future.done()  # ran before submit returned
        assert future.result()["sum"].tolist() == [24.0]
        batcher.submit(rows(1), inline=False).result(5)
    finally:
        batcher.close()
    assert model.threads == [threading.current_thread().name, "batcher-m-0"]


@pytest.mark.parametrize(("delay", "busy"), [(0.05, True), (0.0, True)], ids=["delay", "no-delay"])
def test_inline_requests_queue_when_the_model_is_busy(delay: float, busy: bool) -> None:
    model = ThreadRecorder(delay=0.1 if busy else 0.0)
    batcher = make(model, max_queue_delay_s=delay)
    try:
        if busy:
            first = batcher.submit(rows(1))  # the worker runs it for 0.1 s
            time.sleep(0.02)
        future = batcher.submit(rows(1, value=1.0), inline=True)
        assert not future.done()  # queued, not run by this thread
        assert future.result(5)["sum"].tolist() == [12.0]
        if busy:
            first.result(5)
    finally:
        batcher.close()
    assert threading.current_thread().name not in model.threads


def test_an_inline_failure_fails_only_that_request() -> None:
    batcher = make(Recorder(fail_when=7.0), max_queue_delay_s=0.0)
    try:
        failed = batcher.submit(rows(1, value=7.0), inline=True)
        with pytest.raises(BackendError, match="poisoned batch"):
            failed.result(5)
        assert batcher.submit(rows(1, value=1.0), inline=True).result(5)["sum"].tolist() == [12.0]
    finally:
        batcher.close()


def test_back_to_back_batches_all_reach_their_callers() -> None:
    """Results of a batch are handed out after the next batch is stacked: none is lost,
    including the last one, when nothing follows it."""
    model = Recorder(delay=0.01)
    batcher = make(model, max_batch_size=2, max_queue_delay_s=0.0)
    try:
        futures = [batcher.submit(rows(1, value=float(v))) for v in range(9)]
        results = [f.result(5)["sum"].tolist() for f in futures]
    finally:
        batcher.close()
    assert results == [[v * 12.0] for v in range(9)]
    assert sum(model.calls) == 9 and max(model.calls) <= 2
