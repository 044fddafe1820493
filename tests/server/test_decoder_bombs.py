"""Decompression bombs against real servers: refused with RESOURCE_EXHAUSTED before any
decoding (no memory, no time spent), and the server keeps serving."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import grpc
import make_models
import numpy as np
import pytest
from bombs import pgm_header, tiff_bomb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def encoded(ext: str, image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


def segment(stub: pb_grpc.VisionServiceStub, data: bytes) -> pb.SegmentResponse:
    request = pb.SegmentRequest(model=make_models.SEGMENTER, image=pb.Image(encoded=data))
    return stub.Segment(request, timeout=30)


def refused(stub: pb_grpc.VisionServiceStub, data: bytes, message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        segment(stub, data)
    assert caught.value.code() == EXHAUSTED, caught.value.details()
    assert re.search(message, caught.value.details()), caught.value.details()


def still_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    image = encoded(".png", np.zeros((16, 16, 3), np.uint8))
    reply = segment(pb_grpc.VisionServiceStub(channel), image)
    assert reply.mask.height == 16 and reply.mask.width == 16


def test_tiff_bomb_is_refused_without_decoding_and_the_server_serves_on(
    grpc_channel: grpc.Channel, vision_stub: pb_grpc.VisionServiceStub
) -> None:
    """The in-process server: its memory is this process's."""
    bomb = tiff_bomb(30_000, 30_000)  # 0.9 MB; decoded: 0.9 GB, 1.7 GB peak, ~5 s of CPU
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    refused(vision_stub, bomb, r"30000x30000 = 900000000 pixels, more than the server's limit")
    assert time.monotonic() - started < 2.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024 < 100  # MB
    still_serving(grpc_channel)


def test_the_serve_command_and_settings_do_not_import_cv2() -> None:
    """`visionserve serve` reads its settings, then sets OpenCV's bound, then imports the
    server: importing cv2 before that (even indirectly) would make the bound too late."""
    code = (
        "import sys, visionserve.cli, visionserve.commands.serve, visionserve.server.settings;"
        "sys.exit('cv2' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_visionserve_serve_bounds_every_opencv_decoder_by_max_pixels(
    model_repository: Path,
) -> None:
    """`visionserve serve --max-pixels 1000000`: formats without a header check here
    (PNM) are refused by OpenCV's own bound, set from --max-pixels, before allocating:
    a PPM of 1.5 MP that would decode fine is refused, so is a PGM declaring 30000x30000
    (without the bound: "could not be decoded", INVALID_ARGUMENT) and a TIFF bomb."""
    env = {**os.environ, "VISIONSERVE_WORKERS": "2", "VISIONSERVE_INTRA_OP_THREADS": "1"}
    env.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)  # set by tests/conftest.py for this process
    command = [sys.executable, "-m", "visionserve.cli", "serve", "--repository"]
    command += [str(model_repository), "--port", "0", "--max-pixels", "1000000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        port = int(re.search(r"serving on .*:(\d+)$", line.strip()).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            still_serving(channel)
            before = _peak_rss_mb(process.pid)
            stub = pb_grpc.VisionServiceStub(channel)
            ppm = encoded(".ppm", np.zeros((1000, 1500, 3), np.uint8))
            refused(stub, ppm, "declares more than the server's limit of 1000000 pixels")
            refused(stub, pgm_header(30_000, 30_000), "declares more than the server's limit")
            refused(stub, tiff_bomb(30_000, 30_000), "30000x30000")
            assert _peak_rss_mb(process.pid) - before < 50
            still_serving(channel)
    finally:
        process.kill()
        process.wait()
