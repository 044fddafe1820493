"""The asyncio front end on real servers: no starved stream, a flood shed at once with
RESOURCE_EXHAUSTED, health answered while saturated, nothing lost on drain, malformed
bytes answered INVALID_ARGUMENT (in-band in a stream), the stream limit, the token
checked before a large body."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import cv2
import grpc
import make_models
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_test_helpers import metric, scrape
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc

SEG = make_models.SEGMENTER
SEGMENT_METHOD = "/visionserve.v1.VisionService/Segment"
STREAM_METHOD = "/visionserve.v1.VisionService/SegmentStream"
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length beyond the message


def _request(seed: int) -> pb.SegmentRequest:
    image = np.random.default_rng(seed).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    _, data = cv2.imencode(".png", image)
    return pb.SegmentRequest(model=SEG, image=pb.Image(encoded=data.tobytes()), request_id=str(seed))


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _check_health(channel: grpc.aio.Channel) -> tuple[int, float]:
    start = time.monotonic()
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return reply.status, time.monotonic() - start


def test_64_long_lived_streams_are_all_served_on_default_settings(start_server) -> None:
    server = start_server()

    async def main() -> tuple[list[float], float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.VisionServiceStub(channel)
            firsts: list[float] = []

            async def stream(i: int) -> grpc.aio.StreamStreamCall:
                call = stub.SegmentStream(timeout=30)
                start = time.monotonic()
                for k in range(3):
                    await call.write(_request(i * 10 + k))
                    reply = await call.read()
                    assert reply.error_code == 0 and reply.request_id == str(i * 10 + k)
                    if k == 0:
                        firsts.append(time.monotonic() - start)
                return call  # left open: every stream lives until all have been served

            calls = await asyncio.gather(*(stream(i) for i in range(64)))
            status, check_s = await _check_health(channel)
            assert status == health_pb2.HealthCheckResponse.SERVING
            for call in calls:
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
            return firsts, check_s

    firsts, check_s = _run(main())
    assert len(firsts) == 64 and max(firsts) < 10, sorted(firsts)[-5:]
    assert check_s < 0.5


def test_2000_streams_opened_at_once_all_reach_the_server(start_server) -> None:
    """grpc.aio takes one stream call at a time; the rest wait in gRPC core, which
    dropped some past its default 1,000 pending calls (the client's first write failed
    INTERNAL "Internal error from Core"): every stream under --max-streams is answered."""
    server = start_server()
    request = pb.SegmentRequest(
        model=SEG, image=pb.Image(raw=pb.RawImage(data=bytes(32 * 32 * 3), height=32, width=32, channels=3))
    )

    async def main() -> dict[str, int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.VisionServiceStub(channel)

            async def stream() -> str:
                call = stub.SegmentStream(timeout=100)
                try:
                    await call.write(request)
                    reply = await call.read()
                    await call.done_writing()
                    assert await call.read() == grpc.aio.EOF
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name}: {exc.details()}"
                return "OK" if reply.error_code == 0 else reply.error_message

            outcomes = await asyncio.gather(*(stream() for _ in range(2000)))
            return dict(collections.Counter(outcomes))

    assert asyncio.run(asyncio.wait_for(main(), 110)) == {"OK": 2000}


def test_a_flood_is_shed_at_once_and_health_answers_while_saturated(start_server) -> None:
    # 4 admitted at a time; a busy model gathers for 2 s, so admitted requests hold their
    # slots and the rest of the flood must be refused, not queued: a queued request would
    # wait >= 2 s. A refusal costs the (in-process) server and client a few ms of event
    # loop each, so the 30th of 60 simultaneous refusals is answered after ~0.15 s here.
    # An idle model runs a request at once: when the admitted ones each found it idle (the
    # tiny model takes ~0.1 ms), a wave ends quickly without saturating it; the next wave
    # is sent, up to 5, until one leaves the model saturated for the health probe.
    server = start_server(
        max_admitted=4, max_queue_delay_ms=2000, max_batch_size=64, metrics_port=0
    )

    async def main() -> tuple[list[tuple[str, float, str]], list[float]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.VisionServiceStub(channel)

            answered: list[str] = []

            async def one(i: int) -> tuple[str, float, str]:
                start = time.monotonic()
                try:
                    await stub.Segment(_request(i), timeout=20)
                    outcome = "OK", time.monotonic() - start, ""
                except grpc.aio.AioRpcError as exc:
                    outcome = exc.code().name, time.monotonic() - start, exc.details() or ""
                answered.append(outcome[0])
                return outcome

            async def probe() -> list[float]:
                seconds = []
                for _ in range(5):
                    status, check_s = await _check_health(channel)
                    assert status == health_pb2.HealthCheckResponse.SERVING
                    seconds.append(check_s)
                    await asyncio.sleep(0.02)
                return seconds

            await asyncio.wait_for(channel.channel_ready(), 10)  # connecting is not shedding
            await _check_health(channel)
            outcomes: list[tuple[str, float, str]] = []
            for wave in range(5):
                flood = asyncio.gather(*(one(64 * wave + i) for i in range(64)))
                seen = -1
                while len(answered) != seen:  # until the refusals are back (none for 0.1 s)
                    seen = len(answered)
                    await asyncio.sleep(0.1)
                if not flood.done():  # the admitted requests still hold every slot
                    checks = await probe()  # health while the model is saturated
                    return outcomes + await flood, checks
                outcomes += await flood
            raise AssertionError(f"5 waves of 64 never saturated the model: {outcomes}")

    outcomes, checks = _run(main())
    codes = [code for code, _, _ in outcomes]
    shed = [(s, d) for code, s, d in outcomes if code == "RESOURCE_EXHAUSTED"]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.count("OK") >= 4 and len(shed) >= 20, codes
    assert all("admission limit (--max-admitted)" in d and SEG in d for _, d in shed)
    shed_s = sorted(s for s, _ in shed)
    print(f"shed p50 {shed_s[len(shed) // 2] * 1e3:.1f} ms, max {shed_s[-1] * 1e3:.1f} ms")
    assert shed_s[len(shed) // 2] < 1.0, shed_s  # refused at once, not queued
    assert max(checks) < 0.5
    text = scrape(server.metrics_port)
    assert metric(text, "visionserve_shed_total", model=SEG, reason="capacity") == len(shed)


def test_drain_answers_every_admitted_request_and_tells_streams_to_finish(start_server) -> None:
    server = start_server(max_queue_delay_ms=2000, max_batch_size=64, grace_period_s=10)

    async def main() -> tuple[list[str], list[pb.SegmentResponse], int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.VisionServiceStub(channel)

            async def one(i: int) -> str:
                try:
                    await stub.Segment(_request(i), timeout=20)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            unary = [asyncio.ensure_future(one(i)) for i in range(16)]
            stream = stub.SegmentStream(timeout=20)
            for i in range(3):
                await stream.write(_request(100 + i))
            admission = server.registry.get(SEG).admission
            for _ in range(500):  # all 16 + the stream's 3 items admitted (or already done:
                # an idle model runs its first request at once), the rest gathering for 2 s;
                # items the server has not read when the drain begins are new items, answered
                # UNAVAILABLE in-band by design
                done = sum(call.done() for call in unary)
                if server.gate.in_flight + done >= 17 and admission.admitted + done >= 19:
                    break
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            stopped = loop.run_in_executor(None, lambda: server.stop(10).wait())
            await asyncio.sleep(0.1)
            status, _ = await _check_health(channel)
            await stream.write(_request(103))  # sent after the drain began
            answers = [await stream.read() for _ in range(4)]
            await stream.done_writing()
            assert await stream.read() == grpc.aio.EOF
            results = list(await asyncio.gather(*unary))
            await stopped
            return results, answers, status

    results, answers, status = _run(main())
    assert results == ["OK"] * 16
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert [a.error_code for a in answers[:3]] == [0, 0, 0]
    assert answers[3].error_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "shutting down" in answers[3].error_message and answers[3].request_id == "103"


def test_malformed_bytes_are_invalid_argument_and_a_stream_goes_on(vision_server) -> None:
    good = _request(7).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{vision_server.port}") as channel:
        unary = channel.unary_unary(SEGMENT_METHOD)
        with pytest.raises(grpc.RpcError) as err:
            unary(GARBAGE, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf message" in err.value.details()
        stream = channel.stream_stream(STREAM_METHOD, response_deserializer=pb.SegmentResponse.FromString)
        answers = list(stream(iter([good, GARBAGE, good]), timeout=20))
    assert [a.error_code for a in answers] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "6 bytes" in answers[1].error_message


def test_while_every_model_that_could_take_a_call_is_full_it_is_refused_unread(
    start_server,
) -> None:
    """The segmenter at its admission limit (--max-admitted 2, both slots held): Segment
    is refused RESOURCE_EXHAUSTED with the model's own message before its body is read
    (bytes that would be INVALID_ARGUMENT get the same refusal), counted as shed; Classify
    (its models have room) and health are served; KServe ModelInfer, which any model may
    take, is read as usual; once a slot is free, Segment is served again."""
    server = start_server(max_admitted=2, metrics_port=0)
    admission = server.registry.get(SEG).admission
    admission.try_admit()
    admission.try_admit()
    classify = pb.ClassifyRequest(model=make_models.CLASSIFIER, image=_request(2).image)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            segment = channel.unary_unary(SEGMENT_METHOD)
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            refused = []
            for body in (_request(1).SerializeToString(), GARBAGE):
                with pytest.raises(grpc.RpcError) as err:
                    segment(body, timeout=10)
                refused.append((err.value.code(), err.value.details()))
            with pytest.raises(grpc.RpcError) as err:
                infer(GARBAGE, timeout=10)
            classified = pb_grpc.VisionServiceStub(channel).Classify(classify, timeout=10)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            admission.release(2)
            after = pb_grpc.VisionServiceStub(channel).Segment(_request(3), timeout=10)
    finally:
        while admission.admitted:
            admission.release()
    for code, details in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert SEG in details and "admission limit (--max-admitted)" in details, details
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert classified.top and health.status == health_pb2.HealthCheckResponse.SERVING
    assert after.request_id == "3"
    assert metric(scrape(server.metrics_port), "visionserve_shed_total", model=SEG, reason="capacity") == 2
    assert server.registry.get(SEG).statistics.snapshot().fail.count == 2  # ModelStatistics


def test_streams_past_the_limit_are_refused(start_server) -> None:
    server = start_server(max_streams=2)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        gates = [threading.Event() for _ in range(2)]

        def held(gate: threading.Event):  # type: ignore[no-untyped-def]
            yield _request(1)
            gate.wait(10)

        open_calls = [stub.SegmentStream(held(g), timeout=20) for g in gates]
        for call in open_calls:
            assert next(call).error_code == 0
        with pytest.raises(grpc.RpcError) as err:
            list(stub.SegmentStream(iter([_request(2)]), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams 2" in err.value.details()
        for gate in gates:
            gate.set()
        for call in open_calls:
            assert list(call) == []
        assert len(list(stub.SegmentStream(iter([_request(3)]), timeout=10))) == 1


def test_a_wrong_token_is_refused_before_a_large_body_is_read(start_server) -> None:
    server = start_server(auth_token="s3cret", max_message_bytes=64 * 1024 * 1024)
    body = pb.SegmentRequest(model=SEG, image=pb.Image(encoded=b"\0" * (48 * 1024 * 1024)))
    with grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(body, metadata=[("authorization", "Bearer wrong")], timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "wrong bearer token" in err.value.details()


def _garbage_after(calls) -> list[object]:  # type: ignore[no-untyped-def]
    """What the cyclic garbage collector would have to free after ``calls()`` ran."""
    import gc

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        calls()
        time.sleep(0.3)  # the server's side of the last call finishes
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_refused_call_frees_its_request_at_once(start_server) -> None:
    """Refusals are the call's status, not ``context.abort``: its exception, kept by the
    call's state, held the handlers' frames and the request body in a reference cycle
    until a garbage collection (whose pauses fell on the event loop under a flood)."""
    server = start_server(auth_token="s3cret")
    token = [("authorization", "Bearer s3cret")]
    unknown = _request(1)
    unknown.model = "no-such-model"

    def calls() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub, raw = pb_grpc.VisionServiceStub(channel), channel.unary_unary(SEGMENT_METHOD)
            for _ in range(20):
                for call, metadata, code in (
                    (lambda m: stub.Segment(unknown, metadata=m, timeout=10), token,
                     grpc.StatusCode.NOT_FOUND),
                    (lambda m: raw(b"\x0a\xff\xff\xff\xff\x0f", metadata=m, timeout=10), token,
                     grpc.StatusCode.INVALID_ARGUMENT),
                    (lambda m: stub.Segment(unknown, metadata=m, timeout=10), [],
                     grpc.StatusCode.UNAUTHENTICATED),
                ):  # fmt: skip
                    with pytest.raises(grpc.RpcError) as err:
                        call(metadata)
                    assert err.value.code() == code

    garbage = _garbage_after(calls)
    held = [o for o in garbage if isinstance(o, pb.SegmentRequest)]
    frames = [o.f_code.co_qualname for o in garbage
              if type(o).__name__ == "frame" and "visionserve" in o.f_code.co_filename]  # fmt: skip
    assert not held and not frames, (len(held), sorted(set(frames)))
    assert len(garbage) < 60 * 12, len(garbage)  # gRPC's own: ~5 objects per call


def test_the_loop_lag_counts_when_the_loop_keeps_falling_behind() -> None:
    from visionserve.server.interceptors import Gate

    async def main() -> tuple[float, float, float]:
        gate = Gate(8, max_lag_s=0.1)
        watch = asyncio.get_running_loop().create_task(gate.watch_loop())
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 - one stall: the calls it held are taken at once
        await asyncio.sleep(0.03)
        one_stall = gate.lag_s
        for _ in range(8):  # busy again and again: the loop keeps falling behind
            time.sleep(0.1)  # noqa: ASYNC251 - on purpose
            await asyncio.sleep(0)
        behind = gate.lag_s
        await asyncio.sleep(0.3)
        watch.cancel()
        return one_stall, behind, gate.lag_s

    one_stall, behind, after = _run(main())
    assert one_stall < 0.05 and behind > 0.08 and after < 0.05, (one_stall, behind, after)


def test_while_the_loop_lags_inference_calls_are_refused_unread(start_server) -> None:
    """A loop kept ~100 ms behind (its thread blocked in slices) with --max-loop-lag-ms 50:
    Classify is refused RESOURCE_EXHAUSTED naming the setting (counted as shed "loop"),
    health and GetModel still answer; once the loop keeps up, Classify is served."""
    server = start_server(max_loop_lag_ms=50, metrics_port=0)
    done = threading.Event()

    async def lag_the_loop() -> None:
        while not done.is_set():
            time.sleep(0.1)  # noqa: ASYNC251 - the loop kept behind on purpose
            await asyncio.sleep(0)

    server._loop.submit(lag_the_loop())
    request = _request(3)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.VisionServiceStub(channel)
            time.sleep(0.3)
            codes, details = [], ""
            for _ in range(5):
                try:
                    stub.Segment(request, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    details = exc.details()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            info = stub.GetModel(pb.GetModelRequest(model=SEG), timeout=10)
            done.set()
            time.sleep(0.3)
            after = stub.Segment(request, timeout=10)
    finally:
        done.set()
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 3, codes
    assert "ms behind" in details and "--max-loop-lag-ms 50" in details, details
    assert health.status == health_pb2.HealthCheckResponse.SERVING and info.name == SEG
    assert after.request_id == "3"
    assert metric(scrape(server.metrics_port), "visionserve_shed_total", model="", reason="loop") >= 3
