"""Inference below the front end: CPU models compute at a lower priority (Linux nice, per
thread) than the event loop and decoding, so a refusal or a health answer does not wait
behind a batch when the cores are all busy (``--inference-nice``)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import make_models
import numpy as np
import pytest
from visionserve.server.backends import registry as backends
from visionserve.server.backends.registry import load_backend
from visionserve.server.cores import call_at_lower_priority
from visionserve.server.registry import load_model
from visionserve.server.repository import ModelRepository

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="nice is a thread's own on Linux only"
)


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def here() -> int:
    return nice_of(threading.get_native_id())


def test_a_lowered_call_runs_below_the_caller_and_so_do_the_threads_it_starts() -> None:
    base = here()

    def work() -> tuple[int, int]:
        seen: list[int] = []
        child = threading.Thread(target=lambda: seen.append(here()))
        child.start()
        child.join()
        return here(), seen[0]

    own, child = call_at_lower_priority(3, work)
    assert (own, child) == (min(base + 3, 19),) * 2
    assert here() == base  # the caller's own priority is untouched
    assert call_at_lower_priority(0, here) == base  # 0: the caller's priority


def test_an_error_in_a_lowered_call_reaches_the_caller() -> None:
    def fails() -> None:
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        call_at_lower_priority(2, fails)


def test_a_cpu_backend_is_created_below_a_gpu_backend_at_the_callers_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_models.write_entry(
        tmp_path, "cls", "classification", backends=("tensorrt", "onnxruntime-cpu")
    )
    seen: dict[str, int] = {}

    def no_gpu(entry, intra_op_threads):  # type: ignore[no-untyped-def]
        seen["tensorrt"] = here()
        raise RuntimeError("no GPU in this test")

    real_cpu = backends.FACTORIES["onnxruntime-cpu"]

    def cpu(entry, intra_op_threads):  # type: ignore[no-untyped-def]
        seen["onnxruntime-cpu"] = here()
        return real_cpu(entry, intra_op_threads)

    monkeypatch.setitem(backends.FACTORIES, "tensorrt", no_gpu)
    monkeypatch.setitem(backends.FACTORIES, "onnxruntime-cpu", cpu)
    base = here()
    load_backend(ModelRepository(tmp_path).entry("cls"), 2, nice=4).close()
    assert seen == {"tensorrt": base, "onnxruntime-cpu": min(base + 4, 19)}


def test_a_cpu_model_computes_every_batch_below_the_threads_that_call_it(tmp_path: Path) -> None:
    """The batcher's threads and ONNX Runtime's pool (2 threads: the caller + 1) run 5
    steps lower; the answers are those of the same model at the same priority."""
    make_models.write_entry(tmp_path, "cls", "classification")
    entry = ModelRepository(tmp_path).entry("cls")
    base, before = here(), threads()
    model = load_model(entry, intra_op_threads=2, inference_nice=5)
    try:
        added = {tid: nice_of(tid) for tid in threads() - before}
        lowered = [tid for tid, nice in added.items() if nice == min(base + 5, 19)]
        # one batcher thread per instance + ONNX Runtime's one pool thread
        assert len(lowered) >= model.config.instances + 1, added
        tensor = model.prepare(np.full((*make_models.CLASSIFIER_HW, 3), 90, np.uint8))
        lowered_out = model.submit(tensor).result(timeout=30)
    finally:
        model.close()
    same = load_model(entry, intra_op_threads=2, inference_nice=0)
    try:
        plain_out = same.submit(tensor).result(timeout=30)
    finally:
        same.close()
    assert here() == base
    for name, value in plain_out.items():
        np.testing.assert_allclose(lowered_out[name], value, rtol=1e-5, atol=1e-6)


def policy_of(tid: int) -> int:
    """The scheduling policy of a thread of this process (/proc: field 41 of stat)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[38])


def test_20_puts_a_cpu_models_threads_under_the_idle_policy(tmp_path: Path) -> None:
    """``--inference-nice 20``: the batcher's threads and ONNX Runtime's pool run under
    SCHED_IDLE (any other thread of ours that wakes takes the core at once); the caller
    keeps its own policy, and the answers are the model's."""
    make_models.write_entry(tmp_path, "cls", "classification")
    entry = ModelRepository(tmp_path).entry("cls")
    before, mine = threads(), policy_of(threading.get_native_id())
    model = load_model(entry, intra_op_threads=2, inference_nice=20)
    try:
        added = {tid: policy_of(tid) for tid in threads() - before}
        idle = [tid for tid, policy in added.items() if policy == os.SCHED_IDLE]
        assert len(idle) >= model.config.instances + 1, added  # batchers + ONNX Runtime's pool
        tensor = model.prepare(np.full((*make_models.CLASSIFIER_HW, 3), 90, np.uint8))
        out = model.submit(tensor).result(timeout=30)
    finally:
        model.close()
    assert policy_of(threading.get_native_id()) == mine == os.SCHED_OTHER
    assert np.isfinite(next(iter(out.values()))).all()
