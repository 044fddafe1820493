"""`visionserve segment` ends, whatever its --streams / --window / --per-message and the
number of images, and --give-up-after fires when the server stops answering."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import make_models
import pytest
from client_helpers import ServerProcess, make_dataset

from visionserve.cli import main
from visionserve.clients import AsyncVisionClient
from visionserve.clients._batch import BatchRunner, BatchSettings, BatchStopped, Job
from visionserve.clients._journal import Journal

RUN_LIMIT_S = 30.0  # a run of <= 12 tiny images takes well under a second


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("data"), 12, noise=False)


def run_bounded(args: list[str]) -> int:
    """``main(args)`` in a thread; fails the test (instead of hanging it) past RUN_LIMIT_S."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(args)), daemon=True)
    thread.start()
    thread.join(RUN_LIMIT_S)
    assert not thread.is_alive(), f"visionserve {' '.join(args)} hung for {RUN_LIMIT_S}s"
    return result[0]


def one_image_list(images: Path, tmp_path: Path, count: int) -> Path:
    """A list file naming the first ``count`` images (the CLI takes list files)."""
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(images.rglob("*.png"))[:count]) + "\n")
    return listing


@pytest.mark.parametrize("count", [1, 12])
@pytest.mark.parametrize("per_message", [1, 3, 8])
@pytest.mark.parametrize("window", [1, 2, 16])
@pytest.mark.parametrize("streams", [1, 3])
def test_every_combination_finishes(
    server_address: str,
    images: tuple[Path, Path],
    tmp_path: Path,
    streams: int,
    window: int,
    per_message: int,
    count: int,
) -> None:
    """Before the fix, --streams 1 --window 1 reserved 8 file slots from a pool of 2 and
    waited forever."""
    source = one_image_list(images[0], tmp_path, count)
    out = tmp_path / "out"
    args = ["segment", str(source), "--server", server_address, "--model", make_models.SEGMENTER]
    args += ["--out", str(out), "--no-progress", "--give-up-after", "10"]
    args += ["--streams", str(streams), "--window", str(window), "--per-message", str(per_message)]
    assert run_bounded(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["segmented"] == count and report["failed"] == 0
    assert len(list((out / "masks").rglob("*.png"))) == count


def test_give_up_after_fires_when_the_server_stops_answering(
    server_process, images: tuple[Path, Path], tmp_path: Path
) -> None:
    """A frozen server (SIGSTOP: connections accepted by the kernel, nothing answered):
    the run stops with BatchStopped shortly after --give-up-after, long before --timeout."""
    server: ServerProcess = server_process()
    paths = sorted(images[0].rglob("*.png"))
    jobs = [Job(p.name, p, None, tmp_path / "masks" / p.name) for p in paths]
    settings = BatchSettings(
        model=make_models.SEGMENTER,
        version="",
        num_classes=len(make_models.LABELS),
        ignore_index=255,
        streams=2,
        window=2,
        timeout=60.0,
        give_up_after=1.5,
        out_root=tmp_path,
    )

    async def run() -> float:
        async with AsyncVisionClient(server.address, timeout=60.0) as client:
            with Journal(tmp_path / "journal.jsonl", {"model": settings.model}) as journal:
                runner = BatchRunner(client, settings, journal)
                started = time.monotonic()
                with pytest.raises(BatchStopped, match="no answer from .* for 2s"):
                    await runner.run(jobs)
                return time.monotonic() - started

    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        elapsed = asyncio.run(asyncio.wait_for(run(), RUN_LIMIT_S))
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert 1.5 <= elapsed < 5.0
