"""The README's demo command, end to end, in its quick form (the full run is timed by hand).

Runs the real subcommands as subprocesses: generate -> train -> export -> serve on a free
port -> classify + segment -> stop. Checks what a user would look at afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from visionserve.server.model_config import ModelConfig


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "visionserve.cli", "demo", "--quick", "--workdir", str(work)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mean IoU" in proc.stdout and "server stopped" in proc.stdout
    for name, task in (("shapes-resnet", "classification"), ("shapes-unet", "segmentation")):
        config = ModelConfig.load(work / "models" / name / "model.yaml")
        assert config.task == task
        validation = json.loads((work / "models" / name / "1" / "validation.json").read_text())
        assert validation["passed"] is True
    report = json.loads((work / "results/segment/report.json").read_text())
    masks = sorted((work / "results/segment/masks").rglob("*.png"))
    images = sorted((work / "data/val/images").glob("*.png"))
    assert len(masks) == len(images) == 32
    image = cv2.imread(str(images[0]))
    mask = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == image.shape[:2] and mask.max() <= 3
    assert 0.0 <= report["iou"]["mean_iou"] <= 1.0
    assert (work / "results/classes.csv").read_text().count("\n") == 33  # header + 32 rows
