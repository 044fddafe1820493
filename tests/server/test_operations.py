"""Metrics, limits and deadlines on private real servers."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import grpc
import make_models
import numpy as np
import pytest
from server_test_helpers import metric, scrape
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.model_config import InputSpec

CLS, SEG = make_models.CLASSIFIER, make_models.SEGMENTER
SLOW = "slow-segmenter"


def png(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", rgb)
    assert ok
    return buffer.tobytes()


GREEN = pb.Image(encoded=png(np.full((8, 8, 3), (0, 200, 0), np.uint8)))


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    """tiny-classifier + a segmenter whose 1536x1536 input makes each request ~0.1 s."""
    make_models.write_entry(tmp_path, CLS, "classification")
    spec = InputSpec(
        name="image", height=1536, width=1536, mean=make_models.MEAN, std=make_models.STD
    )
    make_models.write_entry(tmp_path, SLOW, "segmentation", input=spec, max_batch_size=1)
    return tmp_path


def test_metrics_count_requests_failures_batches_and_in_flight(start_server) -> None:
    server = start_server(metrics_port=0)
    assert server.metrics_port
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        for _ in range(3):
            stub.Classify(pb.ClassifyRequest(model=CLS, image=GREEN), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Classify(pb.ClassifyRequest(model="missing", image=GREEN), timeout=10)
    method = "/visionserve.v1.VisionService/Classify"
    # an aborted call's status can reach the client a moment before the server's
    # interceptor has counted it
    for _ in range(50):
        text = scrape(server.metrics_port)
        if metric(text, "visionserve_request_failures_total", method=method, code="NOT_FOUND"):
            break
        threading.Event().wait(0.02)
    assert metric(text, "visionserve_requests_total", method=method) == 4
    assert metric(text, "visionserve_request_failures_total", method=method, code="NOT_FOUND") == 1
    assert metric(text, "visionserve_requests_in_flight", method=method) == 0
    # warm-up ran batches of 1 and 4 (max_batch_size) directly; the 3 + 1 warm-up requests
    # went through the batcher
    assert metric(text, "visionserve_batch_size_count", model=CLS) >= 4
    assert metric(text, "visionserve_queue_seconds_count", model=CLS) >= 4
    assert metric(text, "visionserve_compute_seconds_count", model=CLS) >= 4
    assert metric(text, "visionserve_inference_rows_total", model=CLS) >= 4


def test_message_size_limit_applies_to_requests_and_responses(start_server) -> None:
    server = start_server(max_message_bytes=200_000)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
        raw = pb.RawImage(data=noise.tobytes(), height=300, width=300, channels=3)  # 270 kB
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(model=CLS, image=pb.Image(raw=raw)), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a small PNG whose raw mask answer (600 x 600 = 360 kB) is over the limit
        flat = pb.Image(encoded=png(np.zeros((600, 600, 3), np.uint8)))
        request = pb.SegmentRequest(model=SEG, image=flat, mask_format=pb.MASK_FORMAT_RAW)
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Segment(pb.SegmentRequest(model=SEG, image=flat), timeout=10).mask.height == 600


def test_a_full_queue_answers_resource_exhausted(start_server, slow_repository) -> None:
    server = start_server(
        repository=slow_repository,
        workers=24,
        max_queue_size=2,
        instances=1,
        max_queue_delay_ms=0,
        admission_wait_ms=0,  # admission control off: the batcher's own bound is tested
    )
    codes: list[grpc.StatusCode] = []
    messages: list[str] = []
    image = pb.Image(encoded=png(np.zeros((16, 16, 3), np.uint8)))
    barrier = threading.Barrier(20)

    def call(stub: pb_grpc.VisionServiceStub) -> None:
        barrier.wait()
        try:
            stub.Segment(pb.SegmentRequest(model=SLOW, image=image), timeout=60)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            messages.append(exc.details())

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        threads = [threading.Thread(target=call, args=(stub,)) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, messages
    assert all("request queue is full (2 requests waiting)" in m for m in messages)


@pytest.mark.parametrize("admission_wait_ms", [1000.0], ids=["admission"])
def test_expired_requests_never_reach_the_backend(
    start_server, slow_repository, admission_wait_ms: float
) -> None:
    # A runs for ~0.1 s on the one instance; B (50 ms deadline) cannot run before it
    # expires: admission control refuses it at once (RESOURCE_EXHAUSTED). Never inferred.
    # (The batcher's own drop of expired requests: tests/server/test_batcher.py; through
    # a server, on a loaded machine, its timing is not deterministic.)
    server = start_server(
        repository=slow_repository, metrics_port=0, admission_wait_ms=admission_wait_ms
    )
    rows_before = metric(scrape(server.metrics_port), "visionserve_inference_rows_total", model=SLOW)
    image = pb.Image(encoded=png(np.zeros((16, 16, 3), np.uint8)))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        first = stub.Segment.future(pb.SegmentRequest(model=SLOW, image=image), timeout=30)
        threading.Event().wait(0.03)
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(pb.SegmentRequest(model=SLOW, image=image), timeout=0.05)
        expected = "RESOURCE_EXHAUSTED" if admission_wait_ms else "DEADLINE_EXCEEDED"
        assert err.value.code().name == expected, err.value.details()
        first.result()
        threading.Event().wait(0.3)
        text = scrape(server.metrics_port)
        assert metric(text, "visionserve_inference_rows_total", model=SLOW) == rows_before + 1


def test_command_line_batching_overrides_every_model(start_server) -> None:
    server = start_server(max_batch_size=2, instances=2)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = pb_grpc.VisionServiceStub(channel).GetModel(pb.GetModelRequest(model=SEG))
    assert info.max_batch_size == 2
    assert server.registry.get(SEG).config.instances == 2
