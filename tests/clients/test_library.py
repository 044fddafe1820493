"""The client library against a real server: asyncio client, streams, retries, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import make_models
import numpy as np
import pytest
from client_helpers import free_port

from visionserve.clients import (
    AsyncVisionClient,
    ChannelConfig,
    RetryPolicy,
    VisionClient,
    VisionServeError,
    segment_request,
)


def block_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, classes = make_models.block_image(np.random.default_rng(seed), block=(2, 2))
    return image, np.repeat(np.repeat(classes, 2, axis=0), 2, axis=1)


def test_async_client_classify_segment_and_models(server_address: str) -> None:
    image, truth = block_pair(1)

    async def go() -> None:
        async with AsyncVisionClient(server_address, timeout=10) as client:
            await client.wait_ready(5)
            blue = np.zeros((8, 8, 3), np.uint8)
            blue[..., 2] = 230
            assert (
                await client.classify(blue, model=make_models.CLASSIFIER, top_k=2)
            ).label == "blue"
            result = await client.segment(image, model=make_models.SEGMENTER, ground_truth=truth)
            np.testing.assert_array_equal(result.mask, make_models.segmenter_reference(image))
            assert result.iou.mean_iou == pytest.approx(1.0)
            assert make_models.SEGMENTER in {m.name for m in await client.list_models()}
            with pytest.raises(VisionServeError) as info:
                await client.get_model("missing")
            assert info.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(go())


def stream_requests() -> list:
    requests = []
    for i in range(6):
        image, truth = block_pair(10 + i)
        requests.append(
            segment_request(
                image,
                model=make_models.SEGMENTER,
                ground_truth=truth,
                request_id=f"r{i}",
                raw_mask=bool(i % 2),
            )
        )
    requests.insert(3, segment_request(b"garbage", model=make_models.SEGMENTER, request_id="bad"))
    return requests


def check_stream_items(items: list) -> None:
    assert [getattr(i, "request_id", None) for i in items] == [
        "r0",
        "r1",
        "r2",
        "bad",
        "r3",
        "r4",
        "r5",
    ]
    bad = items[3]
    assert isinstance(bad, VisionServeError) and bad.code == grpc.StatusCode.INVALID_ARGUMENT
    for i, item in enumerate(items[:3] + items[4:]):
        image, _ = block_pair(10 + i)
        np.testing.assert_array_equal(item.mask, make_models.segmenter_reference(image))
        assert item.iou.pixel_accuracy == 1.0


def test_sync_stream_answers_each_request_in_order(server_address: str) -> None:
    with VisionClient(server_address) as client:
        check_stream_items(list(client.segment_stream(stream_requests(), timeout=30)))


def test_async_stream_answers_each_request_in_order(server_address: str) -> None:
    async def go() -> list:
        async with AsyncVisionClient(server_address) as client:
            return [item async for item in client.segment_stream(stream_requests(), timeout=30)]

    check_stream_items(asyncio.run(go()))


def test_unavailable_is_retried_until_the_server_comes_up(start_server) -> None:
    port = free_port()
    starter = threading.Timer(0.8, lambda: start_server(port=port))
    starter.start()
    policy = RetryPolicy(retries=40, initial_backoff=0.05, max_backoff=0.2)
    try:
        with VisionClient(f"127.0.0.1:{port}", retry_policy=policy, timeout=5) as client:
            t0 = time.monotonic()
            info = client.get_model(make_models.SEGMENTER)
            assert info.name == make_models.SEGMENTER and time.monotonic() - t0 >= 0.7
    finally:
        starter.join()


def test_other_errors_and_deadlines_are_not_retried(server_address: str) -> None:
    slow_policy = RetryPolicy(retries=3, initial_backoff=5.0, max_backoff=5.0)
    with VisionClient(server_address, retry_policy=slow_policy) as client:
        t0 = time.monotonic()
        with pytest.raises(VisionServeError) as info:
            client.segment(b"not an image", model=make_models.SEGMENTER)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(VisionServeError) as info:
            # a deadline no server can meet: 1 ms for 3 MiB of raw pixels (a 64x64 image in
            # 1 us let a fast local server answer before gRPC's millisecond timer fired)
            client.segment(
                np.zeros((1024, 1024, 3), np.uint8), model=make_models.SEGMENTER, timeout=1e-3
            )
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.0
        assert isinstance(info.value.__cause__, grpc.RpcError)


def test_unreachable_server_gives_up_after_the_retries() -> None:
    policy = RetryPolicy(retries=2, initial_backoff=0.1, max_backoff=0.1)
    with VisionClient(f"127.0.0.1:{free_port()}", retry_policy=policy, timeout=2) as client:
        t0 = time.monotonic()
        with pytest.raises(VisionServeError) as info:
            client.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.retryable
        assert time.monotonic() - t0 >= 0.2


def test_retry_policy_and_channel_config_check_their_arguments(tmp_path: Path) -> None:
    assert list(RetryPolicy(retries=4, initial_backoff=0.5, max_backoff=1.5).delays()) == [
        0.5,
        1.0,
        1.5,
        1.5,
    ]
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        ChannelConfig("h:1", private_key=b"k")
    with pytest.raises(FileNotFoundError, match="PEM"):
        ChannelConfig("h:1", root_certificates=tmp_path / "missing.pem").credentials()
    config = ChannelConfig("h:1", token="abc")
    assert config.metadata() == (("authorization", "Bearer abc"),) and not config.secure
    assert ChannelConfig("h:1", root_certificates=b"-----BEGIN CERTIFICATE-----").secure
    with pytest.raises(ValueError, match="timeout"):
        VisionClient("h:1", timeout=0)
