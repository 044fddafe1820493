"""The HTML report opens offline and renders in headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from client_helpers import make_dataset, segment_args

from visionserve.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_html(server_address: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("html")
    images, gts = make_dataset(root, 24)
    (images / "broken.png").write_bytes(b"not a png")
    out = root / "out"
    assert main(segment_args(images, gts, out, server_address)) == 1
    return out / "report.html"


def test_report_is_self_contained(report_html: Path) -> None:
    html = report_html.read_text()
    assert "<script" not in html
    external = re.findall(r"(?:src|href)=['\"](?!data:)([^'\"]+)", html)
    assert external == [], f"the report must not load anything: {external}"
    assert (
        html.count("data:image/png;base64,") >= 3 * 8
    )  # 8 worst images x (image, prediction, truth)
    assert html.count("<svg") == 3 and "Failures (1)" in html  # broken.png: no ground truth


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(report_html: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            report_html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (1600, 1200)
    assert image.std() > 20, "blank screenshot"
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 100  # text, bars, heat map and thumbnails, not one flat colour
    if keep := os.environ.get("VISIONSERVE_KEEP_SCREENSHOT"):  # to look at it
        shutil.copy(shot, keep)
