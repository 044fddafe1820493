"""An ImageNet-shaped workload: ResNet-18 (random weights) exported into a repository,
and 224x224 PNG images of about 110 KB each.

    python bench/make_imagenet.py OUT [--images 64]

Writes ``OUT/models/resnet18`` (through ``visionserve export``, as a user would) and
``OUT/images/*.png``. The weights are random (seeded): the figures are about serving,
not accuracy, and no download is needed. Images are smoothed noise, which PNG packs to
roughly the size of a natural 224x224 photo (~110 KB). Reused when already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

MODEL = "resnet18"


def write_model(out: Path, samples: Path) -> Path:
    import torch
    from torchvision.models import resnet18

    repository = out / "models"
    if (repository / MODEL / "model.yaml").is_file():
        return repository
    checkpoint = out / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(resnet18(weights=None, num_classes=1000).state_dict(), checkpoint / "resnet18.pth")
    metadata = {
        "architecture": "resnet18",
        "task": "classification",
        "labels": [f"class_{i:03d}" for i in range(1000)],
        "input": {
            "height": 224,
            "width": 224,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    }
    (checkpoint / "model.json").write_text(json.dumps(metadata), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "visionserve.cli",
        "export",
        "--checkpoint",
        str(checkpoint / "resnet18.pth"),
        "--repository",
        str(repository),
        "--name",
        MODEL,
        "--backends",
        "onnxruntime-cpu",
        "--max-batch-size",
        "16",
        "--samples",
        str(samples),
        "--no-tensorrt-check",
    ]
    subprocess.run(command, check=True)
    return repository


def write_images(out: Path, count: int) -> Path:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = images / f"{i:04d}.png"
        if path.exists():
            continue
        noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        image = cv2.GaussianBlur(noise, (0, 0), 1.0)  # ~110 KB as PNG, like a photo
        cv2.imwrite(str(path), image)
    return images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    images = write_images(args.out, args.images)
    repository = write_model(args.out, images)
    sizes = [p.stat().st_size for p in images.glob("*.png")]
    print(f"repository {repository}; {len(sizes)} images, mean {np.mean(sizes) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
