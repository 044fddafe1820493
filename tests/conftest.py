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
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))

import make_models
from visionserve.protos import visionserve_pb2_grpc
from visionserve.server.app import VisionServer, create_server
from visionserve.server.settings import ServerSettings

TEST_MAX_PIXELS = 4_000_000


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
