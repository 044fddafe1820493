"""`visionserve segment` against servers that refuse: streams past the server's
--max-streams, a limit that never frees, requests refused RESOURCE_EXHAUSTED in-band."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import make_models
import pytest
from client_helpers import journal_keys, make_dataset, segment_args, wait_until

from visionserve.cli import main
from visionserve.clients import _batch as batch_module
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.errors import ResourceExhausted
from visionserve.server.service import VisionServicer, error_response


def _shed_streams(server: object) -> float:
    """Streams the server refused past its --max-streams limit."""
    value = server.metrics.registry.get_sample_value(
        "visionserve_shed_total", {"model": "", "reason": "streams"}
    )
    return value or 0.0


def _inferred_rows(server: object) -> float:
    value = server.metrics.registry.get_sample_value(
        "visionserve_inference_rows_total", {"model": make_models.SEGMENTER}
    )
    return value or 0.0


def _assert_each_once(out: Path, images: Path, count: int) -> None:
    """Every image segmented, journaled and written exactly once."""
    report = json.loads((out / "report.json").read_text())
    assert report["segmented"] == count and report["failed"] == 0, report["failures"]
    keys = journal_keys(out)
    assert sorted(keys) == sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert len(list((out / "masks").rglob("*.png"))) == count


@pytest.mark.parametrize("per_message", ["8", "1"])
def test_streams_past_the_servers_limit_retire_and_lose_or_double_nothing(
    start_server, tmp_path: Path, per_message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """--streams 6 against --max-streams 2: four streams are refused RESOURCE_EXHAUSTED,
    their workers retire (their requests go to the other two), and every image is
    inferred, written and journaled once (SegmentBatches and SegmentStream). (A refusal
    that grpc.aio reports as INTERNAL, grpc/grpc#36066, is retried: more than four
    refusals, and a worker may still be backing off when the run ends.)"""
    server = start_server(max_streams=2)
    images, gts = make_dataset(tmp_path, 40)
    before = _inferred_rows(server)
    args = segment_args(images, gts, tmp_path / "out", f"127.0.0.1:{server.port}")
    args += ["--streams", "6", "--per-message", per_message, "--give-up-after", "60"]
    with caplog.at_level(logging.INFO, logger="visionserve.clients._batch"):
        assert main(args) == 0
    _assert_each_once(tmp_path / "out", images, 40)
    assert _shed_streams(server) >= 4  # the refusals happened: the test means something
    logged = [r.getMessage() for r in caplog.records]
    retired = [m for m in logged if "the server limits streams" in m]
    assert 1 <= len(retired) <= 4, logged
    going_on_with = [int(m.split("going on with ")[1][:1]) for m in retired]
    assert going_on_with == [5, 4, 3, 2][: len(retired)]
    assert all("--max-streams 2" in m for m in retired)
    assert _inferred_rows(server) - before == 40  # nothing inferred twice


def _hold_streams(address: str, count: int, release: threading.Event) -> list[object]:
    """``count`` SegmentStream calls held open (no request sent) until ``release``."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.VisionServiceStub(channel)

    def held():  # type: ignore[no-untyped-def]
        release.wait(60)
        return
        yield  # a generator that sends nothing

    calls = [stub.SegmentStream(held(), timeout=90) for _ in range(count)]
    return [channel, *calls]


def test_the_last_stream_never_retires_it_backs_off_until_served(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every stream slot taken by another client: one of the two workers retires, the
    last backs off and retries, and finishes the run once a slot frees up."""
    server = start_server(max_streams=1)
    images, gts = make_dataset(tmp_path, 12)
    release = threading.Event()
    held = _hold_streams(f"127.0.0.1:{server.port}", 1, release)
    wait_until(lambda: server.gate.streams == 1)

    def free_the_slot() -> None:  # once one worker retired and the last was refused twice
        try:
            wait_until(lambda: "going on with 1" in caplog.text)
            refused = _shed_streams(server)
            wait_until(lambda: _shed_streams(server) >= refused + 2)
        finally:
            release.set()

    freer = threading.Thread(target=free_the_slot)
    freer.start()
    args = segment_args(images, gts, tmp_path / "out", f"127.0.0.1:{server.port}")
    args += ["--streams", "2", "--give-up-after", "60"]
    try:
        with caplog.at_level(logging.INFO, logger="visionserve.clients._batch"):
            assert main(args) == 0
    finally:
        release.set()
        freer.join(70)
        held[0].close()
    _assert_each_once(tmp_path / "out", images, 12)
    assert caplog.text.count("the server limits streams; going on with 1") == 1
    assert "reopening in" in caplog.text  # the last one was refused, and tried again


def test_a_server_that_never_frees_a_stream_is_given_up_on(
    start_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last worker retries a refused stream until --give-up-after, which says why."""
    server = start_server(max_streams=1)
    images, gts = make_dataset(tmp_path, 4)
    release = threading.Event()
    held = _hold_streams(f"127.0.0.1:{server.port}", 1, release)
    try:
        wait_until(lambda: server.gate.streams == 1)
        args = segment_args(images, gts, tmp_path / "out", f"127.0.0.1:{server.port}")
        t0 = time.monotonic()
        assert main([*args, "--streams", "3", "--give-up-after", "2"]) == 3
        assert time.monotonic() - t0 < 30
    finally:
        release.set()
        held[0].close()
    err = capsys.readouterr().err
    assert "no answer from" in err and "RESOURCE_EXHAUSTED" in err and "--max-streams 1" in err


def test_a_request_refused_in_band_is_sent_again_then_failed_with_the_reason(
    start_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An item answered RESOURCE_EXHAUSTED in-band (a full queue) is sent again after a
    backoff: refused twice, it is still segmented, once; refused every time, it fails
    after MAX_REFUSALS more tries with the server's message (exit 1), and the run ends."""
    served = VisionServicer._stream_item
    answers: Counter[str] = Counter()

    async def refusing(self, request, deadline, stream):  # type: ignore[no-untyped-def]
        answers[request.request_id] += 1
        if "img001" in request.request_id or answers[request.request_id] <= 2:
            error = ResourceExhausted("the request queue is full: retry later")
            return error_response(request, error, "SegmentStream")
        return await served(self, request, deadline, stream)

    monkeypatch.setattr(VisionServicer, "_stream_item", refusing)
    server = start_server()
    images, gts = make_dataset(tmp_path, 10)
    before = _inferred_rows(server)
    out = tmp_path / "out"
    assert main(segment_args(images, gts, out, f"127.0.0.1:{server.port}")) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["segmented"] == 9 and report["failed"] == 1
    [failure] = report["failures"]
    assert failure["image"] == "a/img001.png"
    assert failure["reason"] == (
        "RESOURCE_EXHAUSTED: the request queue is full: retry later "
        "(answered RESOURCE_EXHAUSTED 4 times)"
    )
    assert answers["a/img001.png"] == batch_module.MAX_REFUSALS + 1
    assert sorted(answers.values()) == [3] * 9 + [4]
    assert sorted(journal_keys(out)) == sorted(
        p.relative_to(images).as_posix() for p in images.rglob("*.png") if "img001" not in p.name
    )
    assert _inferred_rows(server) - before == 9  # each served image inferred once
