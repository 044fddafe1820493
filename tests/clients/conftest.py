"""Fixtures for the client tests (helpers live in client_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from client_helpers import ServerProcess, free_port


@pytest.fixture
def server_process(model_repository: Path, tmp_path: Path) -> Iterator[Callable[[], ServerProcess]]:
    """Factory for started ``ServerProcess`` objects, killed after the test."""
    started: list[ServerProcess] = []

    def start(grace: float = 1.0) -> ServerProcess:
        server = ServerProcess(
            model_repository, free_port(), tmp_path / f"server{len(started)}.log", grace
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
