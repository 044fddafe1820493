"""Admission control's capacity: the inference rate, or the rate of answers while the
model stayed backlogged where that is lower (decoding large images costs more than
inferring them). A clock is passed in so the windows are exact."""

from __future__ import annotations

import time

import pytest
from visionserve.server.admission import SERVED_FRESH_S, Admission, AdmissionPolicy
from visionserve.server.errors import ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gate(clock: Clock, batch: int = 4) -> Admission:
    gate = Admission(
        "m v1", AdmissionPolicy(wait_s=1.0), instances=1, max_batch_size=batch,
        max_queue_size=5000, clock=clock,
    )  # fmt: skip
    gate.on_batch(batch, batch / 2000)  # inference alone: 2000 rows/s
    return gate


def _answer_while_backlogged(gate: Admission, clock: Clock, rate: float, seconds: float) -> None:
    """Keep ``gate`` full enough to be backlogged and answer ``rate`` requests/s."""
    for _ in range(round(rate * seconds)):
        while gate.admitted < 40:
            gate.try_admit()
        clock.now += 1 / rate
        gate.release()


def test_capacity_is_the_inference_rate_until_the_model_is_backlogged() -> None:
    clock = Clock()
    gate = _gate(clock)
    assert gate.capacity == pytest.approx(2000)
    for _ in range(100):  # one request at a time: answered at 20/s, never backlogged
        gate.try_admit()
        clock.now += 0.05
        gate.release()
    assert gate.capacity == pytest.approx(2000) and gate.limit == 2000


def test_answers_while_backlogged_set_the_capacity_and_the_limit() -> None:
    clock = Clock()
    gate = _gate(clock)
    _answer_while_backlogged(gate, clock, rate=50, seconds=5)
    assert gate.capacity == pytest.approx(50, rel=0.05)
    assert gate.limit == pytest.approx(50, abs=3)
    with pytest.raises(ResourceExhausted, match=r"requests/s x --admission-wait-ms 1000"):
        while True:
            gate.try_admit()
    assert gate.admitted == gate.limit


def test_a_window_in_which_the_backlog_ran_out_does_not_count() -> None:
    clock = Clock()
    gate = _gate(clock)
    for _ in range(20):  # 8 in, answered over 0.8 s, the last ones with the backlog gone
        for _ in range(8):
            gate.try_admit()
        for _ in range(8):
            clock.now += 0.1
            gate.release()
    assert gate.capacity == pytest.approx(2000)


def test_a_stale_answer_rate_no_longer_counts() -> None:
    clock = Clock()
    gate = _gate(clock)
    _answer_while_backlogged(gate, clock, rate=50, seconds=3)
    assert gate.capacity == pytest.approx(50, rel=0.05)
    clock.now += SERVED_FRESH_S + 1
    assert gate.capacity == pytest.approx(2000)


def test_the_deadline_check_uses_the_answer_rate() -> None:
    clock = Clock()
    gate = _gate(clock)
    _answer_while_backlogged(gate, clock, rate=50, seconds=3)
    ahead = gate.admitted  # 39: ~0.8 s of work at 50/s
    gate.try_admit(deadline=time.monotonic() + 1.5)
    with pytest.raises(ResourceExhausted, match=rf"{ahead + 1} requests are ahead.* at 5\d images/s"):
        gate.try_admit(deadline=time.monotonic() + 0.5)


def test_every_request_admitted_fits_in_the_batchers_queue() -> None:
    """A lone request runs as a batch of one (adaptive batching) while a burst is
    admitted: with the limit at the queue plus one batch, the queue overflowed and
    admitted stream items were answered "queue full" in-band. The limit (derived or
    ``max_admitted``) is never above the queue, whatever the worker is doing."""
    import threading

    import numpy as np
    from visionserve.server.batcher import Batcher

    running, go = threading.Event(), threading.Event()

    def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        running.set()
        go.wait(10)
        return {"y": batch}

    batcher = Batcher("m v1", infer, max_batch_size=4, max_queue_delay_s=0.0, queue_size=8)
    for policy in (AdmissionPolicy(wait_s=1.0), AdmissionPolicy(max_admitted=100)):
        running.clear(), go.clear()
        gate = Admission("m v1", policy, instances=1, max_batch_size=4, max_queue_size=8)
        gate.on_batch(4, 4 / 2000)  # measured fast: the derived limit would be 2,000
        gate.try_admit()
        futures = [batcher.submit(np.zeros((1, 2), np.float32))]
        assert running.wait(10)  # a batch of one is running, holding the only instance
        with pytest.raises(ResourceExhausted, match="admission limit") as refused:
            while True:
                gate.try_admit()
                futures.append(batcher.submit(np.zeros((1, 2), np.float32)))  # never "queue full"
        assert "8 requests are already queued or running" in str(refused.value)
        assert len(futures) == gate.admitted == gate.limit == 8
        go.set()
        assert all(f.result(10)["y"].shape == (1, 2) for f in futures)
        for _ in futures:
            gate.release()
    batcher.close(10)


def test_a_request_of_several_images_takes_a_slot_per_image() -> None:
    """KServe ModelInfer with N encoded images puts N rows in the batcher's queue: it is
    admitted as N, so admitted work still fits in the queue. On an idle model a request
    of more images than the limit is admitted (else it never would be)."""
    gate = Admission("m v1", AdmissionPolicy(max_admitted=8), instances=1, max_batch_size=4)
    gate.try_admit(count=6)
    with pytest.raises(ResourceExhausted, match="8 requests are already queued or running"):
        gate.try_admit(count=3)
    gate.try_admit(count=2)
    assert gate.admitted == 8
    gate.release(6)
    gate.release(2)
    assert gate.admitted == 0
    gate.try_admit(count=12)  # idle: admitted whole
    assert gate.admitted == 12
    with pytest.raises(ResourceExhausted):
        gate.try_admit()
    gate.release(12)
    assert gate.admitted == 0


def test_full_message_is_the_refusal_try_admit_would_give_and_counts_nothing() -> None:
    shed: list[str] = []

    class Observer:
        def on_shed(self, reason: str) -> None:
            shed.append(reason)

    gate = Admission("m v1", AdmissionPolicy(max_admitted=2), instances=1, max_batch_size=1,
                     observer=Observer())  # fmt: skip
    assert gate.full_message() is None  # idle
    gate.try_admit()
    assert gate.full_message() is None and gate.full_message(2) is not None  # one slot left
    gate.try_admit()
    message = gate.full_message()
    with pytest.raises(ResourceExhausted) as refused:
        gate.try_admit()
    assert message == str(refused.value) and "(--max-admitted)" in message
    assert shed == ["capacity"]  # try_admit's refusal only
    gate.release(2)
    assert gate.full_message() is None
    off = Admission("m v1", AdmissionPolicy(wait_s=0), instances=1, max_batch_size=1)
    for _ in range(5):
        off.try_admit()
    assert off.full_message() is None  # admission control off: never full
