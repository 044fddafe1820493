"""SegmentStream: many requests in flight from one stream, answers in request order."""

from __future__ import annotations

import asyncio

import queue
import threading
import time

import grpc
import make_models
import numpy as np
import pytest
from server_test_helpers import metric, scrape
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.service import MAX_BATCH_REQUESTS
from visionserve.server.stream import pipeline

SEG = make_models.SEGMENTER


def _requests(count: int, seed: int = 0) -> tuple[list[pb.SegmentRequest], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    requests, expected = [], []
    for i in range(count):
        image, _ = make_models.block_image(rng, grid=(16, 16), block=(2, 3))
        raw = pb.RawImage(data=image.tobytes(), height=32, width=48, channels=3)
        requests.append(
            pb.SegmentRequest(
                model=SEG,
                image=pb.Image(raw=raw),
                request_id=str(i),
                mask_format=pb.MASK_FORMAT_RAW,
            )
        )
        expected.append(make_models.segmenter_reference(image))
    return requests, expected


def _mask(reply: pb.SegmentResponse) -> np.ndarray:
    return np.frombuffer(reply.mask.data, np.uint8).reshape(reply.mask.height, reply.mask.width)


def test_one_stream_fills_batches_and_keeps_order(start_server) -> None:
    server = start_server(metrics_port=0, max_queue_delay_ms=20, max_batch_size=8)
    requests, expected = _requests(64)
    requests[5] = pb.SegmentRequest(model="nope", request_id="5")
    before = scrape(server.metrics_port)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = list(pb_grpc.VisionServiceStub(channel).SegmentStream(iter(requests), timeout=60))
    assert [r.request_id for r in replies] == [str(i) for i in range(64)]
    assert replies[5].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    for i, reply in enumerate(replies):
        if i != 5:
            assert reply.error_code == 0
            np.testing.assert_array_equal(_mask(reply), expected[i])
    text = scrape(server.metrics_port)
    batches, rows = (
        metric(text, name, model=SEG) - metric(before, name, model=SEG)
        for name in ("visionserve_batch_size_count", "visionserve_batch_size_sum")
    )
    # one stream, real batches: requests arriving while the model is busy are gathered
    assert rows == 63 and rows / batches > 1.5


def test_a_lock_step_client_gets_each_answer_before_sending_the_next(vision_stub) -> None:
    requests, expected = _requests(5, seed=1)
    outbox: queue.Queue = queue.Queue()

    def send():
        while (item := outbox.get()) is not None:
            yield item

    outbox.put(requests[0])
    replies = vision_stub.SegmentStream(send(), timeout=30)
    for i in range(5):
        reply = next(replies)  # would hang if the server waited for more requests first
        assert reply.request_id == str(i)
        np.testing.assert_array_equal(_mask(reply), expected[i])
        outbox.put(requests[i + 1] if i + 1 < 5 else None)
    assert list(replies) == []


def test_a_cancelled_stream_releases_its_models(start_server) -> None:
    server = start_server(model_control="explicit", max_queue_delay_ms=200, max_batch_size=64)
    requests, _ = _requests(10)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.VisionServiceStub(channel).SegmentStream(iter(requests), timeout=30)
        threading.Event().wait(0.05)
        call.cancel()
        with pytest.raises(grpc.RpcError):
            list(call)
    done = threading.Event()
    threading.Thread(target=lambda: (server.registry.unload(SEG), done.set())).start()
    assert done.wait(3), "unload waited for requests that a cancelled stream never released"


async def _items(values):  # type: ignore[no-untyped-def]
    for value in values:
        yield value


async def _echo(value):  # type: ignore[no-untyped-def]
    return value


def test_pipeline_refuses_a_zero_window() -> None:
    async def first() -> None:
        await pipeline(_items([1]), _echo, 0).__anext__()

    with pytest.raises(ValueError, match="window must be at least 1"):
        asyncio.run(first())


# -- SegmentBatches: several requests per message ------------------------------------
def test_segment_batches_answers_each_message_with_its_requests_in_order(vision_stub) -> None:
    requests, expected = _requests(20, seed=2)
    requests[7] = pb.SegmentRequest(model="nope", request_id="7")
    messages = [pb.SegmentBatch(requests=requests[i : i + 6]) for i in range(0, 20, 6)]
    replies = list(vision_stub.SegmentBatches(iter(messages), timeout=60))
    assert [len(reply.responses) for reply in replies] == [6, 6, 6, 2]
    answers = [answer for reply in replies for answer in reply.responses]
    assert [a.request_id for a in answers] == [str(i) for i in range(20)]
    assert answers[7].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "nope" in answers[7].error_message
    for i, answer in enumerate(answers):
        if i != 7:
            assert answer.error_code == 0
            np.testing.assert_array_equal(_mask(answer), expected[i])


def test_segment_batches_refuses_an_oversized_message_in_band_and_goes_on(vision_stub) -> None:
    too_many, _ = _requests(MAX_BATCH_REQUESTS + 1, seed=3)
    small, expected = _requests(2, seed=4)
    messages = [pb.SegmentBatch(requests=too_many), pb.SegmentBatch(requests=small)]
    refused, served = list(vision_stub.SegmentBatches(iter(messages), timeout=60))
    assert len(refused.responses) == MAX_BATCH_REQUESTS + 1
    for answer in refused.responses:
        assert answer.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert f"carries {MAX_BATCH_REQUESTS + 1} requests" in answer.error_message
        assert f"at most {MAX_BATCH_REQUESTS}" in answer.error_message
    assert [a.error_code for a in served.responses] == [0, 0]
    for answer, mask in zip(served.responses, expected):
        np.testing.assert_array_equal(_mask(answer), mask)


def test_pipeline_window_counts_each_message_by_its_weight() -> None:
    begun: list[list[int]] = []

    async def handle(message: list[int]) -> list[int]:
        begun.append(message)
        return message

    async def main() -> list[list[int]]:
        answers = pipeline(_items([[1, 2, 3], [4, 5], [6] * 10]), handle, 4, weight=len)
        first = await answers.__anext__()
        assert first == [1, 2, 3]
        await asyncio.sleep(0.2)  # the reader began what the window allows, and waits
        assert begun == [[1, 2, 3]]  # 3 + 2 requests > a window of 4
        # answering [1, 2, 3] makes room; a message heavier than the window goes alone
        return [first] + [answer async for answer in answers]

    assert asyncio.run(main()) == [[1, 2, 3], [4, 5], [6] * 10]
    assert begun == [[1, 2, 3], [4, 5], [6] * 10]
