"""Messages over the server's --max-message-mb: gRPC ends the call RESOURCE_EXHAUSTED, as
a full server does; the client tells them apart by gRPC's text. Real servers with a
1 MiB limit and incompressible (noise) PNGs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import grpc
import make_models
import numpy as np
import pytest
from client_helpers import journal_keys, make_dataset, segment_args, write_png

from visionserve.cli import main
from visionserve.clients import AsyncVisionClient, VisionClient, VisionServeError
from visionserve.clients._errors import message_too_large

MIB = 1024 * 1024


def _noise(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _add_image(images: Path, gts: Path, name: str, side: int, seed: int) -> int:
    """A noise PNG (and its ground truth) of side x side pixels; its size in bytes."""
    path = write_png(images / name, _noise(side, seed))
    write_png(gts / name, np.zeros((side, side), np.uint8))
    return path.stat().st_size


def _inferred_rows(server: object) -> float:
    value = server.metrics.registry.get_sample_value(
        "visionserve_inference_rows_total", {"model": make_models.SEGMENTER}
    )
    return value or 0.0


def _segment(
    server: object, images: Path, gts: Path, out: Path, *extra: str
) -> tuple[int, float, dict]:
    """``visionserve segment`` (one stream, logging INFO): (exit code, seconds, report)."""
    args = segment_args(images, gts, out, f"127.0.0.1:{server.port}")
    args += ["--streams", "1", "--give-up-after", "60", *extra]
    started = time.monotonic()
    logger = logging.getLogger("visionserve.clients")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        code = main(args)
    finally:
        logger.setLevel(level)
    report = json.loads((out / "report.json").read_text())
    return code, time.monotonic() - started, report


def _assert_written_once(out: Path, images: Path, failed: str = "") -> None:
    """Every image but ``failed`` journaled and its mask written, once."""
    expected = [p.relative_to(images).as_posix() for p in images.rglob("*.png")]
    expected = [key for key in expected if key != failed]
    assert sorted(journal_keys(out)) == sorted(expected)
    assert len(list((out / "masks").rglob("*.png"))) == len(expected)


def test_a_request_over_the_limit_says_which_limit_and_the_fix(
    start_server, tmp_path: Path
) -> None:
    """gRPC's own text ('SERVER: Received message larger than max (N vs. M)'), from a real
    server, is recognised; the sync and asyncio clients' errors name the size, the
    server's limit and the fix."""
    server = start_server(max_message_bytes=MIB)
    address = f"127.0.0.1:{server.port}"
    big = write_png(tmp_path / "big.png", _noise(700, 1))
    with VisionClient(address) as client, pytest.raises(VisionServeError) as caught:
        client.segment(big, model=make_models.SEGMENTER)

    async def aio() -> VisionServeError:
        async with AsyncVisionClient(address) as client:
            with pytest.raises(VisionServeError) as error:
                await client.segment(big, model=make_models.SEGMENTER)
            return error.value

    for error in (caught.value, asyncio.run(aio())):
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "SERVER: Received message larger than max (" in error.details
        assert f" vs. {MIB})" in error.details  # gRPC's text, kept
        too_large = message_too_large(error)
        assert too_large is not None and too_large.request and too_large.server
        assert too_large.limit == MIB and too_large.size > big.stat().st_size
        assert "over the server's message limit of 1.00 MiB (1048576 bytes)" in error.details
        assert "raise the server's --max-message-mb" in error.details
        assert "smaller or compressed images" in error.details
    # a full server's RESOURCE_EXHAUSTED is no message too large
    full = VisionServeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams (--max-streams)")
    assert message_too_large(full) is None


@pytest.mark.parametrize("per_message", ["8", "1"])
def test_an_image_over_the_limit_fails_with_the_reason_and_the_rest_finish(
    start_server, tmp_path: Path, per_message: str
) -> None:
    """One 1.4 MB noise PNG among 12 small images, server limit 1 MiB: the big one fails
    at once with its size, the limit and the fix; every other mask is written, journaled
    once; exit 1, in seconds (not at --give-up-after)."""
    server = start_server(max_message_bytes=MIB)
    images, gts = make_dataset(tmp_path, 12)
    big_bytes = _add_image(images, gts, "big.png", 700, seed=2)
    assert big_bytes > MIB
    out = tmp_path / "out"
    before = _inferred_rows(server)
    extra = ("--per-message", per_message, "--streams", "2")
    code, seconds, report = _segment(server, images, gts, out, *extra)
    assert code == 1 and seconds < 20
    assert report["segmented"] == 12 and report["failed"] == 1, report["failures"]
    [failure] = report["failures"]
    assert failure["image"] == "big.png"
    reason = failure["reason"]
    assert reason.startswith("RESOURCE_EXHAUSTED: the request is 1.4")
    assert "over the server's message limit of 1.00 MiB (1048576 bytes)" in reason
    assert "raise the server's --max-message-mb, or send smaller or compressed images" in reason
    _assert_written_once(out, images, failed="big.png")
    # the big one never reached the model; small ones in flight when the stream ended
    # were sent again (their answers lost with it)
    assert _inferred_rows(server) - before >= 12


def test_messages_too_large_only_packed_are_packed_smaller(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight 300 kB noise PNGs fit a 1 MiB limit alone, not eight to a SegmentBatch: the
    first message is refused, the client learns the limit and packs at most 1 MiB per
    message from then on; every image is segmented once, exit 0."""
    server = start_server(max_message_bytes=MIB)
    images, gts = make_dataset(tmp_path, 4)
    sizes = [_add_image(images, gts, f"mid{i}.png", 320, seed=10 + i) for i in range(8)]
    assert max(sizes) < MIB < sum(sizes)
    out = tmp_path / "out"
    before = _inferred_rows(server)
    code, seconds, report = _segment(server, images, gts, out, "--per-message", "8")
    assert code == 0 and seconds < 20
    assert "messages packed up to 1048576 bytes from now on" in caplog.text  # it happened
    assert "Received message larger than max" in caplog.text
    assert report["segmented"] == 12 and report["failed"] == 0, report["failures"]
    _assert_written_once(out, images)
    assert _inferred_rows(server) - before == 12


def test_answers_over_the_limit_pack_fewer_and_one_too_large_alone_fails(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Flat PNGs are small requests, but the client asks raw masks: three 700x700 masks
    (490 kB each) are over a 1 MiB answer, one 1100x1100 mask (1.2 MB) is alone. The
    server ends the stream 'Sent message larger than max'; answers come in order, so the
    oldest message is the culprit: packed, later messages carry fewer requests; alone,
    that image fails with the answer's size and the fix. Exit 1, the rest written once."""
    server = start_server(max_message_bytes=MIB)
    images, gts = make_dataset(tmp_path, 4)
    for i in range(6):
        write_png(images / f"flat{i}.png", np.full((700, 700, 3), 40 * i, np.uint8))
        write_png(gts / f"flat{i}.png", np.zeros((700, 700), np.uint8))
    write_png(images / "huge.png", np.zeros((1100, 1100, 3), np.uint8))
    write_png(gts / "huge.png", np.zeros((1100, 1100), np.uint8))
    out = tmp_path / "out"
    code, seconds, report = _segment(server, images, gts, out, "--per-message", "8")
    assert code == 1 and seconds < 30
    assert "request(s) per message from now on" in caplog.text  # packed answers were refused
    assert report["segmented"] == 10 and report["failed"] == 1, report["failures"]
    [failure] = report["failures"]
    assert failure["image"] == "huge.png"
    assert failure["reason"].startswith("RESOURCE_EXHAUSTED: the answer is 1.15 MiB")
    assert "over the server's message limit of 1.00 MiB" in failure["reason"]
    assert "raise the server's --max-message-mb" in failure["reason"]
    _assert_written_once(out, images, failed="huge.png")
