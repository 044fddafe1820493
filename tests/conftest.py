"""Shared fixtures: a tiny model repository and a real server on a free port.

Reusable by every test package (server, clients):

- ``model_repository``: REPO with ``tiny-classifier`` (versions 1, 2) and
  ``tiny-segmenter`` (version 1), built by ``tests/models/make_models.py``
  (importable in tests as ``import make_models`` for its references and constants).
- ``server_settings``, ``vision_server`` (the started ``VisionServer``; ``.port``),
  ``server_address`` ("127.0.0.1:PORT"), ``grpc_channel``, ``vision_stub``,
  ``health_stub``: one server per test session.
- ``start_server``: a factory for a private server (``start_server(**settings)``),
  stopped after the test, for tests that stop or reconfigure it.

GPU gating lives here, once: a test marked ``gpu`` (a CUDA GPU), ``onnxruntime_cuda``
(ONNX Runtime with CUDAExecutionProvider) or ``tensorrt`` (a TensorRT runtime that runs
on this GPU) is skipped, with the reason, where that is missing. ``VISIONSERVE_REQUIRE_GPU=1``
(the GPU machine, ``scripts/gpu-check.sh``) runs them regardless, so a missing GPU or
runtime is a failure there, not a skip.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))

from visionserve.server.decoder_guard import limit_decoders
from visionserve.server.settings import ServerSettings

# OpenCV's decoder bound is read when cv2 is first imported: set it, as `visionserve serve`
# does, before anything below imports cv2, to the default pixel limit (servers of tests
# with a lower limit check every format's header but PNM/HDR/JPEG 2000/AVIF's).
DEFAULT_MAX_PIXELS = next(
    f.default for f in dataclasses.fields(ServerSettings) if f.name == "max_decoded_pixels"
)
assert limit_decoders(DEFAULT_MAX_PIXELS), "cv2 was imported before tests/conftest.py"

import make_models  # noqa: E402
from visionserve.protos import visionserve_pb2_grpc  # noqa: E402
from visionserve.server.app import VisionServer, create_server  # noqa: E402

TEST_MAX_PIXELS = 4_000_000
REQUIRE_GPU = os.environ.get("VISIONSERVE_REQUIRE_GPU") == "1"


@functools.cache
def _missing(mark: str) -> str | None:
    """Why a test marked ``mark`` cannot run here (None: it can)."""
    from visionserve.server.engine_compat import detect_gpu, gpu_runtime_unavailable

    if mark == "gpu":
        name, _, reason = detect_gpu(0)
        return None if name is not None else f"needs a CUDA GPU: {reason}"
    if mark == "onnxruntime_cuda":
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return f"needs onnxruntime-gpu: this onnxruntime build offers {providers}"
        return None
    reason = gpu_runtime_unavailable()  # "tensorrt"
    return None if reason is None else f"needs TensorRT and a GPU it runs on: {reason}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip GPU-marked tests where their hardware or runtime is missing (see above)."""
    if REQUIRE_GPU:
        return
    for mark in ("gpu", "onnxruntime_cuda", "tensorrt"):
        if item.get_closest_marker(mark) is not None and (reason := _missing(mark)):
            pytest.skip(reason)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with the tiny classifier and segmenter."""
    return make_models.write_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="session")
def server_settings(model_repository: Path) -> ServerSettings:
    """Settings of the session server: port 0, small thread counts, 4 MP pixel limit."""
    return ServerSettings(
        repository=model_repository,
        port=0,
        workers=4,
        intra_op_threads=1,
        max_decoded_pixels=TEST_MAX_PIXELS,
        grace_period_s=1.0,
    )


@pytest.fixture(scope="session")
def vision_server(server_settings: ServerSettings) -> Iterator[VisionServer]:
    """The session's running server (stopped at the end of the session)."""
    server, _ = create_server(server_settings)
    yield server
    server.stop(None).wait()
    server.close()


@pytest.fixture(scope="session")
def server_address(vision_server: VisionServer) -> str:
    return f"127.0.0.1:{vision_server.port}"


@pytest.fixture(scope="session")
def grpc_channel(server_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


@pytest.fixture(scope="session")
def vision_stub(grpc_channel: grpc.Channel) -> visionserve_pb2_grpc.VisionServiceStub:
    return visionserve_pb2_grpc.VisionServiceStub(grpc_channel)


@pytest.fixture(scope="session")
def health_stub(grpc_channel: grpc.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(grpc_channel)


@pytest.fixture
def start_server(model_repository: Path) -> Iterator[Callable[..., VisionServer]]:
    """Factory: ``start_server(**overrides)`` -> a private started server on port 0."""
    started: list[VisionServer] = []

    def start(**overrides: object) -> VisionServer:
        fields = {"repository": model_repository, "port": 0, "workers": 2, "intra_op_threads": 1}
        fields.update(overrides)
        server, _ = create_server(ServerSettings(**fields))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(None).wait()
        server.close()
