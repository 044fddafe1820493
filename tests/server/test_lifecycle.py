"""Model control (poll, explicit) and graceful shutdown, under load, on real servers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import grpc
import make_models
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.app import model_health_name

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CLS, SEG = make_models.CLASSIFIER, make_models.SEGMENTER
_, _png = cv2.imencode(".png", np.full((8, 8, 3), (0, 200, 0), np.uint8))
CLASSIFY = pb.ClassifyRequest(model=CLS, image=pb.Image(encoded=_png.tobytes()))
SEGMENT = pb.SegmentRequest(model=SEG, image=pb.Image(encoded=_png.tobytes()))


class Load:
    """``clients`` threads calling ``call(stub)`` until stopped; outcomes by status code."""

    def __init__(self, address: str, call, clients: int = 8, stop_on=()) -> None:
        self.codes: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()
        self.details: list[str] = []
        self._call, self._stop_on = call, stop_on
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(address)
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        stub = pb_grpc.VisionServiceStub(self._channel)
        deadline = time.monotonic() + 60  # bounded, whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                reply = self._call(stub)
                with self._lock:
                    self.codes["OK"] += 1
                    self.seen[reply.version] += 1
            except grpc.RpcError as exc:
                with self._lock:
                    self.codes[exc.code().name] += 1
                    self.details.append(exc.details())
                if exc.code() in self._stop_on:
                    return

    def stop(self) -> Counter[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(70)
        self._channel.close()
        return self.codes


def _wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# -- poll: new versions are loaded, warmed, swapped in; zero failed requests ------------------
def _add_version(repo: Path, version: int) -> None:
    """Write the version beside the repository, then move it in (atomic on one filesystem)."""
    staging = repo / f".staging-{version}"
    staging.mkdir()
    shutil.copy(repo / CLS / "1" / "model.onnx", staging / "model.onnx")
    staging.rename(repo / CLS / str(version))


def test_poll_reload_under_load_fails_no_request(start_server, tmp_path: Path) -> None:
    repo = make_models.write_repository(tmp_path / "repo")
    server = start_server(repository=repo, model_control="poll", poll_interval_s=0.1, workers=8)
    load = Load(f"127.0.0.1:{server.port}", lambda s: s.Classify(CLASSIFY, timeout=20), clients=6)
    try:
        time.sleep(0.3)
        _add_version(repo, 3)  # new latest version
        _wait_for(lambda: load.seen["3"] > 20)
        model = repo / CLS / "3" / "model.onnx"
        model.write_bytes(model.read_bytes())  # same version, new file: reloaded in place
        stat = model.stat()
        os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        first = server.registry.get(CLS, "3")
        _wait_for(lambda: server.registry.get(CLS, "3") is not first)
        shutil.rmtree(repo / CLS / "2")
        _wait_for(lambda: server.registry.versions(CLS) == [1, 3])
        time.sleep(0.3)
    finally:
        codes = load.stop()
    assert codes["OK"] > 50 and set(codes) == {"OK"}, (codes, load.details[:3])
    assert load.seen["2"] > 0 and load.seen["3"] > 0


def test_a_broken_new_version_leaves_the_old_ones_serving(start_server, tmp_path: Path) -> None:
    repo = make_models.write_repository(tmp_path / "repo")
    server = start_server(repository=repo, model_control="poll", poll_interval_s=0.1)
    (repo / CLS / "5").mkdir()
    (repo / CLS / "5" / "model.onnx").write_bytes(b"not a model")
    time.sleep(0.5)
    assert server.registry.versions(CLS) == [1, 2]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert pb_grpc.VisionServiceStub(channel).Classify(CLASSIFY, timeout=10).version == "2"


# -- explicit: RepositoryModelLoad / Unload -------------------------------------------------------
def test_explicit_load_and_unload(start_server) -> None:
    server = start_server(model_control="explicit", load_models=(CLS,))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        vision = pb_grpc.VisionServiceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            vision.Segment(SEGMENT, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest())
        assert (SEG, "UNAVAILABLE") in {(m.name, m.state) for m in index.models}

        kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=SEG), timeout=30)
        assert vision.Segment(SEGMENT, timeout=10).mask.height == 8
        check = health_pb2.HealthCheckRequest(service=model_health_name(SEG))
        assert health.Check(check).status == health_pb2.HealthCheckResponse.SERVING

        kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=CLS), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            vision.Classify(CLASSIFY, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        check = health_pb2.HealthCheckRequest(service=model_health_name(CLS))
        assert health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING

        for name, code in (("nope", "NOT_FOUND"), ("../etc", "INVALID_ARGUMENT")):
            with pytest.raises(grpc.RpcError) as err:
                kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=name))
            assert err.value.code().name == code


def test_explicit_unload_under_load_finishes_accepted_requests(start_server) -> None:
    server = start_server(model_control="explicit", max_queue_delay_ms=50, workers=8)
    load = Load(
        f"127.0.0.1:{server.port}",
        lambda s: s.Segment(SEGMENT, timeout=20),
        clients=6,
        stop_on=(grpc.StatusCode.NOT_FOUND,),
    )
    time.sleep(0.4)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
            kpb.RepositoryModelUnloadRequest(model_name=SEG), timeout=30
        )
    codes = load.stop()
    # accepted requests finished; the ones after the unload were told NOT_FOUND
    assert codes["OK"] > 10 and set(codes) <= {"OK", "NOT_FOUND"}, (codes, load.details[:3])


# -- SIGTERM: NOT_SERVING, accepted requests finish, exit 0 --------------------------------------
def _read_port(process: subprocess.Popen) -> int:
    for line in process.stdout:
        match = re.search(r"serving on .*:(\d+)$", line.strip())
        if match:
            return int(match.group(1))
    raise AssertionError(f"server exited (rc={process.wait()}) without announcing its port")


def _serve(model_repository: Path, log_path: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """``visionserve serve`` in a subprocess, JSON logs at DEBUG (a line per call):
    (process, port)."""
    command = [
        sys.executable,
        "-m",
        "visionserve.cli",
        "--log-level",
        "DEBUG",
        "serve",
        "--repository",
        str(model_repository),
        "--port",
        "0",
        "--intra-op-threads",
        "1",
        "--log-format",
        "json",
        *extra,
    ]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        return process, _read_port(process)
    except BaseException:
        process.kill()
        process.wait()
        raise


def _log_entries(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def test_sigterm_under_load_loses_no_accepted_request(model_repository: Path, tmp_path) -> None:
    # batches wait up to 150 ms to fill, so requests are always in flight at SIGTERM
    log_path = tmp_path / "server.log"
    process, port = _serve(
        model_repository,
        log_path,
        *("--grace", "20", "--workers", "32", "--max-queue-delay-ms", "150"),
        *("--max-batch-size", "64"),
    )
    try:
        load = Load(
            f"127.0.0.1:{port}",
            lambda s: s.Segment(SEGMENT, timeout=30),
            clients=16,
            stop_on=(grpc.StatusCode.UNAVAILABLE,),
        )
        time.sleep(1.0)
        ok_before = load.codes["OK"]
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=30) == 0
        elapsed = time.monotonic() - started
        codes = load.stop()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Clients got answers or were refused: UNAVAILABLE from the draining server, or,
    # for a call racing the final transport shutdown, CANCELLED by gRPC core before
    # it reached the server's handlers. Nothing timed out or failed inside the server.
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, (codes, load.details[:3])
    assert codes["CANCELLED"] <= 2, codes
    # Requests waiting in the batcher at SIGTERM were still answered.
    assert codes["OK"] > ok_before
    assert elapsed < 20
    # The server's own account: every request its handlers accepted was answered OK
    # and reached its client; the only failures it answered were drain refusals.
    entries = _log_entries(log_path)
    handled = [e for e in entries if e.get("method", "").endswith("/Segment")]
    assert sum(e["code"] == "OK" for e in handled) == codes["OK"]
    assert {e["code"] for e in handled} <= {"OK", "UNAVAILABLE"}
    assert any("draining in-flight requests" in e["message"] for e in entries)


# -- SIGTERM with open streams: received items answered, later ones UNAVAILABLE in-band -----------
STREAMS, STREAM_WINDOW, GRACE_S = 4, 8, 20.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
# 512x512: a few ms of inference each, so the items in flight at SIGTERM are still queued
_big, _ = make_models.block_image(np.random.default_rng(3), grid=(32, 32), block=(16, 16))
BIG_IMAGE = pb.Image(encoded=cv2.imencode(".png", _big)[1].tobytes())


class _Stream:
    """One SegmentStream sending items (``STREAM_WINDOW`` in flight) until its first
    in-band UNAVAILABLE; it then sends nothing more and half-closes once ``close`` is set.
    Every item is recorded as sent before it is written."""

    def __init__(self, stub: pb_grpc.VisionServiceStub, number: int) -> None:
        self.number = number
        self.call = stub.SegmentStream(timeout=120)
        self.sent: list[str] = []
        self.answers: list[pb.SegmentResponse] = []
        self.flowing = asyncio.Event()  # a few answers came: the stream is served
        self._window = asyncio.Semaphore(STREAM_WINDOW)
        self._refused = asyncio.Event()

    async def run(self, close: asyncio.Event) -> grpc.StatusCode:
        sender = asyncio.ensure_future(self._send(close))
        async for answer in self.call:
            self.answers.append(answer)
            self._window.release()
            if answer.error_code == UNAVAILABLE:
                self._refused.set()
            if len(self.answers) >= 3:
                self.flowing.set()
        await sender
        return await self.call.code()

    async def _send(self, close: asyncio.Event) -> None:
        while True:
            await self._window.acquire()
            if self._refused.is_set():
                break
            request_id = f"{self.number}-{len(self.sent)}"
            self.sent.append(request_id)
            request = pb.SegmentRequest(model=SEG, image=BIG_IMAGE, request_id=request_id)
            await self.call.write(request)
        await close.wait()
        await self.call.done_writing()


def test_sigterm_with_open_streams_answers_every_item_once(
    model_repository: Path, tmp_path: Path
) -> None:
    """SIGTERM while streams send: health NOT_SERVING at once, a new stream refused
    UNAVAILABLE; on the open streams every item is answered exactly once, those received
    before the drain OK and the later ones UNAVAILABLE in-band (in order: OKs, then
    refusals), each stream ends OK once its client half-closes, and the process exits 0
    well within --grace with nothing cancelled."""
    log_path = tmp_path / "server.log"
    process, port = _serve(model_repository, log_path, "--grace", str(GRACE_S), "--workers", "4")
    at: dict[str, float] = {}  # time.monotonic() of each step
    answered_at_sigterm: list[int] = []

    async def main() -> tuple[list[_Stream], list[grpc.StatusCode]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.VisionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            close = asyncio.Event()
            streams = [_Stream(stub, n) for n in range(STREAMS)]
            runs = asyncio.gather(*(s.run(close) for s in streams))
            try:
                await asyncio.wait_for(asyncio.gather(*(s.flowing.wait() for s in streams)), 60)
                answered_at_sigterm.extend(len(s.answers) for s in streams)
                process.send_signal(signal.SIGTERM)
                at["sigterm"] = time.monotonic()
                check = health_pb2.HealthCheckRequest()
                while (await health.Check(check, timeout=10)).status != NOT_SERVING:
                    assert time.monotonic() - at["sigterm"] < 10, "health still SERVING"
                    await asyncio.sleep(0.01)
                at["not_serving"] = time.monotonic()
                # our streams are open, so the server is still draining: a new one is refused
                # (nothing written to it: grpc.aio masks a status that races a write as
                # INTERNAL, grpc/grpc#36066)
                late = stub.SegmentStream(timeout=30)
                assert await late.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in await late.details()
            finally:
                close.set()
            return streams, await asyncio.wait_for(runs, 60)

    try:
        streams, codes = asyncio.run(main())
        exit_code = process.wait(timeout=GRACE_S + 30)
        at["exited"] = time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert exit_code == 0
    assert at["not_serving"] - at["sigterm"] < 5.0  # "at once", generous on a loaded machine
    assert at["exited"] - at["sigterm"] < GRACE_S
    assert codes == [grpc.StatusCode.OK] * STREAMS
    for stream in streams:
        ids = [a.request_id for a in stream.answers]
        assert ids == stream.sent, "every item sent answered exactly once, in order"
        outcome = [a.error_code for a in stream.answers]
        first_refusal = outcome.index(UNAVAILABLE)  # each stream stopped sending at one
        assert set(outcome[:first_refusal]) <= {0}, "received before the drain: answered OK"
        assert set(outcome[first_refusal:]) == {UNAVAILABLE}, "after it: refused in-band"
        assert len(outcome) - first_refusal <= STREAM_WINDOW
        assert all("shutting down" in a.error_message for a in stream.answers[first_refusal:])
    # items in flight at SIGTERM (queued behind 512x512 inferences) were still answered OK
    after = [s.answers[n:] for s, n in zip(streams, answered_at_sigterm)]
    assert sum(a.error_code == 0 for answers in after for a in answers) > 0
    entries = _log_entries(log_path)
    calls = [e for e in entries if e.get("method", "").endswith("/SegmentStream")]
    assert sorted(e["code"] for e in calls) == ["OK"] * STREAMS + ["UNAVAILABLE"], calls
    assert any("draining in-flight requests" in e["message"] for e in entries)
    assert not any("grace period over" in e["message"] for e in entries)
