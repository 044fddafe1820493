"""``visionserve serve`` as a real process: port 0, SERVING, SIGTERM -> exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import make_models
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc

SERVE = [sys.executable, "-m", "visionserve.cli", "serve"]


def _read_port(process: subprocess.Popen) -> int:
    for line in process.stdout:
        match = re.search(r"serving on .*:(\d+)$", line.strip())
        if match:
            return int(match.group(1))
    raise AssertionError(f"server exited (rc={process.wait()}) without announcing its port")


def test_serve_subprocess_serves_and_stops_on_sigterm(model_repository: Path) -> None:
    env = {**os.environ, "VISIONSERVE_WORKERS": "2", "VISIONSERVE_INTRA_OP_THREADS": "1"}
    process = subprocess.Popen(
        [*SERVE, "--repository", str(model_repository), "--port", "0", "--grace", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        port = _read_port(process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            ok, png = cv2.imencode(".png", np.full((8, 8, 3), (0, 200, 0), np.uint8))
            reply = pb_grpc.VisionServiceStub(channel).Classify(
                pb.ClassifyRequest(
                    model=make_models.CLASSIFIER, image=pb.Image(encoded=png.tobytes())
                ),
                timeout=10,
            )
            assert reply.top[0].label == "green"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_without_a_repository_exits_2_and_says_why(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VISIONSERVE_REPOSITORY"}
    result = subprocess.run(
        [*SERVE, "--repository", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "repository must be an existing directory" in result.stderr


def test_the_serving_path_never_imports_torch() -> None:
    code = (
        "import sys, visionserve.server.app, visionserve.commands.serve;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
