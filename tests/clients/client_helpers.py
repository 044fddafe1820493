"""Helpers for the client tests: generated data sets and servers run as subprocesses.

(Not in conftest.py: several test folders have a conftest, so ``from conftest import``
is ambiguous.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import make_models
import numpy as np


JOURNAL = ".visionserve-journal.jsonl"


def segment_args(images: Path, gts: Path, out: Path, server: str, *extra: str) -> list[str]:
    return [
        "segment",
        str(images),
        "--server",
        server,
        "--model",
        make_models.SEGMENTER,
        "--gt",
        str(gts),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def journal_keys(out: Path) -> list[str]:
    lines = (out / JOURNAL).read_text().splitlines()
    return [json.loads(line)["key"] for line in lines[1:]]


def write_png(path: Path, array: np.ndarray) -> Path:
    """RGB (HxWx3) or index (HxW) uint8 array -> PNG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    assert cv2.imwrite(str(path), bgr)
    return path


def make_dataset(root: Path, count: int, seed: int = 11, noise: bool = True) -> tuple[Path, Path]:
    """``count`` block images in root/images/{a,b/c}/ and their ground truth in root/gt/.

    The truth is the exact block classes, with (``noise``) 5% ignored pixels and 10%
    relabelled, so IoU is below 1 but exactly predictable.
    """
    rng = np.random.default_rng(seed)
    images, gts = root / "images", root / "gt"
    for i in range(count):
        block = (1 + i % 3, 2)
        image, classes = make_models.block_image(rng, block=block)
        truth = np.repeat(np.repeat(classes, block[0], axis=0), block[1], axis=1)
        if noise:
            truth[rng.random(truth.shape) < 0.05] = 255
            flip = rng.random(truth.shape) < 0.1
            truth[flip & (truth != 255)] = rng.integers(
                0, 4, size=int((flip & (truth != 255)).sum())
            )
        sub = "a" if i % 2 else "b/c"
        write_png(images / sub / f"img{i:03d}.png", image)
        write_png(gts / sub / f"img{i:03d}.png", truth)
    return images, gts


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fails the test past ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout:g}s"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``visionserve serve`` in a subprocess on a fixed port, so it can be killed and restarted."""

    def __init__(self, repository: Path, port: int, log_path: Path, grace: float = 1.0) -> None:
        self.repository, self.port, self.log_path = repository, port, log_path
        self.grace = grace
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "visionserve.cli",
                "--log-level",
                "WARNING",
                "serve",
                "--repository",
                str(self.repository),
                "--port",
                str(self.port),
                "--workers",
                "8",
                "--intra-op-threads",
                "1",
                "--grace",
                str(self.grace),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()  # "visionserve: serving on HOST:PORT"
        if b"serving on" not in line or time.monotonic() > deadline:
            self.kill()
            raise RuntimeError(
                f"server did not start: {line!r}; log: {self.log_path.read_text()[-2000:]}"
            )

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM (a drain, up to --grace): (exit code, seconds until it exited)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.terminate()
        code = self.process.wait(timeout)
        seconds = time.monotonic() - started
        self.process.stdout.close()
        self.process = None
        return code, seconds

    def kill(self) -> None:
        """SIGKILL: no drain, in-flight requests are lost (the client must cope)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        self.process = None


