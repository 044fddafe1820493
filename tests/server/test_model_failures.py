"""A model that fails to load, and a port in use, on real servers.

A broken model is NOT_SERVING (per-model health), GetModel and the log say why, the
other models serve, and it is tried again only when its files change. A second server
on a port in use fails at start-up instead of sharing the port.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
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
from visionserve.server.atomic import write_atomic

CLS = make_models.CLASSIFIER
BROKEN = "broken"
_, _png = cv2.imencode(".png", np.full((8, 8, 3), (0, 200, 0), np.uint8))
CLASSIFY = pb.ClassifyRequest(model=CLS, image=pb.Image(encoded=_png.tobytes()))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REGISTRY_LOG = "visionserve.server.registry"


def repository_with_a_broken_model(root: Path) -> Path:
    """The test repository plus ``broken``: the classifier's model.yaml, garbage ONNX."""
    repo = make_models.write_repository(root)
    shutil.copytree(repo / CLS, repo / BROKEN)
    shutil.rmtree(repo / BROKEN / "2")
    (repo / BROKEN / "1" / "model.onnx").write_bytes(b"not an onnx model")
    return repo


def health(channel: grpc.Channel, model: str) -> int:
    """Per-model health (the whole server's with ``model`` "")."""
    request = health_pb2.HealthCheckRequest(service=model and model_health_name(model))
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == REGISTRY_LOG and "failed to load" in r.getMessage()
    ]


def wait_for(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_a_broken_model_is_not_serving_and_says_why_while_the_others_serve(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = repository_with_a_broken_model(tmp_path / "repo")
    with caplog.at_level(logging.INFO, logger=REGISTRY_LOG):
        server = start_server(repository=repo)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert health(channel, "") == SERVING
        assert health(channel, CLS) == SERVING and health(channel, BROKEN) == NOT_SERVING
        vision = pb_grpc.VisionServiceStub(channel)
        assert vision.Classify(CLASSIFY, timeout=10).top[0].label == "green"
        with pytest.raises(grpc.RpcError) as caught:
            vision.GetModel(pb.GetModelRequest(model=BROKEN), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'broken' failed to load" in caught.value.details()
        assert "Protobuf parsing failed" in caught.value.details()  # ONNX Runtime's reason
        listed = vision.ListModels(pb.ListModelsRequest(), timeout=10)
        assert BROKEN not in [m.name for m in listed.models]
    (line,) = failure_lines(caplog)
    assert "Protobuf parsing failed" in line.getMessage() and "NOT_SERVING" in line.getMessage()
    assert line.exc_info is None  # one line, the traceback only at DEBUG


def test_a_polling_server_tries_a_broken_model_again_only_when_its_files_change(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = repository_with_a_broken_model(tmp_path / "repo")
    onnx = repo / BROKEN / "1" / "model.onnx"
    with caplog.at_level(logging.INFO, logger=REGISTRY_LOG):
        server = start_server(repository=repo, model_control="poll", poll_interval_s=0.05)
        time.sleep(1.0)  # 20 polls
        assert len(failure_lines(caplog)) == 1
        write_atomic(onnx, b"still not a model")  # changed, still broken: one more try
        wait_for(lambda: len(failure_lines(caplog)) == 2)
        time.sleep(0.5)
        assert len(failure_lines(caplog)) == 2
        write_atomic(onnx, (repo / CLS / "1" / "model.onnx").read_bytes())  # fixed
        wait_for(lambda: server.registry.versions(BROKEN) == [1])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert health(channel, BROKEN) == SERVING
        request = pb.ClassifyRequest(model=BROKEN, image=CLASSIFY.image)
        assert pb_grpc.VisionServiceStub(channel).Classify(request, timeout=10).version == "1"


def test_an_explicit_load_of_a_broken_model_answers_the_error_every_time(
    start_server, tmp_path: Path
) -> None:
    repo = repository_with_a_broken_model(tmp_path / "repo")
    server = start_server(repository=repo, model_control="explicit", load_models=(CLS,))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(2):  # same files: an explicit load still tries, and says why
            with pytest.raises(grpc.RpcError) as caught:
                kserve.RepositoryModelLoad(
                    kpb.RepositoryModelLoadRequest(model_name=BROKEN), timeout=30
                )
            assert "Protobuf parsing failed" in caught.value.details()
        assert health(channel, BROKEN) == NOT_SERVING and health(channel, CLS) == SERVING
        index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10)
        (entry,) = [m for m in index.models if m.name == BROKEN]
        assert entry.state == "UNAVAILABLE" and "failed to load" in entry.reason


def test_a_second_server_on_a_port_in_use_fails_to_start(start_server) -> None:
    first = start_server()
    with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{first.port}"):
        start_server(port=first.port)
    with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        assert pb_grpc.VisionServiceStub(channel).Classify(CLASSIFY, timeout=10).top


def test_visionserve_serve_on_a_port_in_use_exits_1_and_says_so(
    start_server, model_repository: Path
) -> None:
    first = start_server()
    env = {**os.environ, "VISIONSERVE_WORKERS": "2", "VISIONSERVE_INTRA_OP_THREADS": "1"}
    command = [sys.executable, "-m", "visionserve.cli", "serve", "--repository"]
    command += [str(model_repository), "--port", str(first.port)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"could not bind 127.0.0.1:{first.port}" in result.stderr
    assert "serving on" not in result.stdout
