"""Calls taken from gRPC core ahead of the event loop (``server/acceptors.py``): while
the loop is held up, calls pile up in core; with ``accept_ahead`` they are taken many per
loop iteration, and every one of them still passes every interceptor (auth, metrics,
gate) and reaches its servicer."""

from __future__ import annotations

import asyncio
import time

import cv2
import grpc
import make_models
import numpy as np
import pytest
from server_test_helpers import metric, scrape
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc

CLASSIFY = "/visionserve.v1.VisionService/Classify"
TOKEN = "s3cret-token"


def _request(seed: int) -> pb.ClassifyRequest:
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    _, data = cv2.imencode(".png", image)
    return pb.ClassifyRequest(model=make_models.CLASSIFIER, image=pb.Image(encoded=data.tobytes()))


async def _burst(port: int, count: int, hold_loop) -> list[grpc.StatusCode]:  # type: ignore[no-untyped-def]
    """``count`` calls, half without the token, sent while the server's loop is held."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pb_grpc.VisionServiceStub(channel)
        good = (("authorization", f"Bearer {TOKEN}"),)

        async def one(i: int) -> grpc.StatusCode:
            try:
                await stub.Classify(_request(i), metadata=good if i % 2 else (), timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        hold_loop(0.5)  # the server's loop sleeps: every call arrives meanwhile
        return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.parametrize("ahead", [16, 0])
def test_calls_taken_ahead_pass_every_interceptor(start_server, ahead: int) -> None:
    # the loop held 0.5 s on purpose: calls refused unread for that lag are not tested here
    server = start_server(auth_token=TOKEN, metrics_port=0, accept_ahead=ahead, max_loop_lag_ms=0)
    loop = server._loop.loop  # the server's event loop thread

    def hold_loop(seconds: float) -> None:
        loop.call_soon_threadsafe(time.sleep, seconds)

    codes = asyncio.run(asyncio.wait_for(_burst(server.port, 48, hold_loop), 60))
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 24, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED,
                          grpc.StatusCode.RESOURCE_EXHAUSTED}, codes  # fmt: skip
    assert codes.count(grpc.StatusCode.OK) >= 1
    text = scrape(server.metrics_port)
    assert metric(text, "visionserve_requests_total", method=CLASSIFY) == 48
    assert (
        metric(text, "visionserve_request_failures_total", method=CLASSIFY, code="UNAUTHENTICATED")
        == 24
    )
    if ahead:
        # taken many at a time once the loop was free again: not all by grpc.aio's one
        assert server.acceptors.taken > 0
    else:
        assert server.acceptors.taken == 0


def test_accept_ahead_is_off_under_grpcs_concurrent_rpc_limit(start_server) -> None:
    # gRPC's own limiter counts only the calls its loop takes: the two do not mix
    server = start_server(max_concurrent_rpcs=8, accept_ahead=16)
    assert server.acceptors.extra == 0


def test_without_grpcs_internals_the_server_serves_as_stock_grpc_aio(
    start_server, monkeypatch
) -> None:
    from visionserve.server import acceptors

    monkeypatch.setattr(acceptors, "_INTERNALS", None)  # another grpcio's shape
    server = start_server(accept_ahead=16)
    assert server.acceptors.extra == 0

    async def call() -> pb.ClassifyResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            return await pb_grpc.VisionServiceStub(channel).Classify(_request(1), timeout=30)

    assert len(asyncio.run(call()).top) >= 1
