"""The front end's threads with the kernel's shortest time slice, inference's with the
default (``sched_slice``): a woken front-end thread (a refusal, a health answer) takes the
core from a batch at once instead of after the batch's slice. Read back from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import cv2
import grpc
import make_models
import numpy as np
import pytest
from server_test_helpers import read_port
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.sched_slice import (
    DEFAULT,
    set_slice,
    thread_slice_ns,
)
from visionserve.server.settings import ServerSettings

SERVE = [sys.executable, "-m", "visionserve.cli", "serve"]
SHORT = {f.name: f.default for f in fields(ServerSettings)}["front_slice_us"] * 1000  # ns


def _in_a_thread(fn):  # type: ignore[no-untyped-def]
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def _custom_slices() -> bool:
    """Whether this kernel keeps a normal thread's own slice (EEVDF, Linux >= 6.12)."""
    return _in_a_thread(lambda: set_slice(SHORT) and thread_slice_ns() == SHORT)


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _custom_slices(),
    reason="a normal thread's own time slice needs Linux >= 6.12 (EEVDF's sched_runtime)",
)


def test_a_thread_takes_the_short_slice_its_children_inherit_it_and_default_restores() -> None:
    default = _in_a_thread(thread_slice_ns)
    assert default is not None and default > SHORT

    def work() -> tuple[int | None, int | None, int | None]:
        assert set_slice(SHORT)
        mine = thread_slice_ns()
        child = _in_a_thread(thread_slice_ns)
        assert set_slice(DEFAULT)
        return mine, child, thread_slice_ns()

    assert _in_a_thread(work) == (SHORT, SHORT, default)
    assert thread_slice_ns() == default  # the caller's own slice is untouched


def _threads(pid: int) -> list[tuple[int, int, int | None]]:
    """(thread id, nice, slice in ns) of every thread of process ``pid``."""
    rows = []
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            rows.append((tid, os.getpriority(os.PRIO_PROCESS, tid), thread_slice_ns(tid, pid)))
        except OSError:
            continue  # the thread ended meanwhile
    return rows


@pytest.mark.parametrize("slice_us", [None, 0])
def test_a_served_models_inference_keeps_the_default_slice_the_front_end_the_short(
    model_repository: Path, slice_us: int | None
) -> None:
    """``visionserve serve`` (default settings: inference 10 nice steps down): every thread
    of the front end (main, event loop, gRPC core's, the decode pool, after a request)
    runs with the short slice; the batchers and ONNX Runtime's pool with the default.
    ``--front-slice-us 0``: every thread with the default."""
    default = _in_a_thread(thread_slice_ns)
    extra = [] if slice_us is None else ["--front-slice-us", str(slice_us)]
    process = subprocess.Popen(
        [*SERVE, "--repository", str(model_repository), "--port", "0", "--grace", "1", *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = read_port(process)
        _, png = cv2.imencode(".png", np.full((8, 8, 3), (0, 200, 0), np.uint8))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pb_grpc.VisionServiceStub(channel).Classify(
                pb.ClassifyRequest(
                    model=make_models.CLASSIFIER, image=pb.Image(encoded=png.tobytes())
                ),
                timeout=30,
            )
        threads = _threads(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    inference = [row for row in threads if row[1] == 10]
    front = [row for row in threads if row[1] == 0]
    # 2 models x (a batcher per instance + ONNX Runtime's pool threads, none on 1 core)
    assert len(inference) >= 2, threads
    assert {row[2] for row in inference} == {default}, threads
    assert len(front) >= 3, threads  # main, the event loop, gRPC's, the decode pool
    assert {row[2] for row in front} == {SHORT if slice_us is None else default}, threads
