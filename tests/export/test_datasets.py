from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from visionserve.export.datasets import (
    CLASSIFICATION_CLASSES,
    DOMINANCE,
    SEGMENTATION_CLASSES,
    generate_dataset,
    label_from_mask,
    load_classes,
    load_dataset,
    read_image,
    read_mask,
    sample,
)


def test_sample_shapes_and_types() -> None:
    image, mask, label = sample(np.random.default_rng(0), 80)
    assert image.shape == (80, 80, 3) and image.dtype == np.uint8
    assert mask.shape == (80, 80) and mask.dtype == np.uint8
    assert 0 <= label < len(CLASSIFICATION_CLASSES)


def test_sample_label_is_the_dominant_visible_class() -> None:
    rng = np.random.default_rng(5)
    labels = []
    for _ in range(200):
        _image, mask, label = sample(rng, 96)
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        areas = np.bincount(mask.ravel(), minlength=4)[1:]
        assert label == int(np.argmax(areas))
        second = np.sort(areas)[-2]
        assert second == 0 or areas[label] >= DOMINANCE * second
        labels.append(label)
    # all three classes occur, roughly balanced
    counts = np.bincount(labels, minlength=3)
    assert counts.min() > 40, counts


def test_label_from_mask() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[:4] = 3  # 40 triangle pixels
    mask[4:6] = 1  # 20 circle pixels
    assert label_from_mask(mask) == (2, 2.0)
    mask[:] = 2
    assert label_from_mask(mask) == (1, float("inf"))


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 6, size=48, seed=3)
    b = generate_dataset(tmp_path / "b", 6, size=48, seed=3)
    c = generate_dataset(tmp_path / "c", 6, size=48, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6 * 2 + 2
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "images/shape_00000.png").read_bytes() != (c / "images/shape_00000.png").read_bytes()


def test_layout_on_disk(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "d", 5, size=64, seed=0)
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["image", "label"]
    assert [r[0] for r in rows[1:]] == [f"shape_{i:05d}.png" for i in range(5)]
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"segmentation": list(SEGMENTATION_CLASSES),
                       "classification": list(CLASSIFICATION_CLASSES)}
    raw_mask = cv2.imread(str(out / "masks/shape_00000.png"), cv2.IMREAD_UNCHANGED)
    assert raw_mask.ndim == 2 and raw_mask.dtype == np.uint8
    examples = load_dataset(out)
    assert len(examples) == 5
    image_path, mask_path, label = examples[0]
    assert image_path == out / "images/shape_00000.png" and mask_path == out / "masks/shape_00000.png"
    assert label in CLASSIFICATION_CLASSES
    for example in examples:
        mask = read_mask(example.mask)
        assert read_image(example.image).shape == (64, 64, 3)
        # the stored label is the dominant class of the stored mask
        assert example.label == CLASSIFICATION_CLASSES[label_from_mask(mask)[0]]


def test_png_round_trip_keeps_pixels(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "d", 1, size=64, seed=9)
    image, mask, _ = sample(np.random.default_rng(9), 64)
    assert np.array_equal(read_image(tmp_path / "d/images/shape_00000.png"), image)
    assert np.array_equal(read_mask(tmp_path / "d/masks/shape_00000.png"), mask)


def test_load_errors_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        load_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="classes.json"):
        load_classes(tmp_path)
    (tmp_path / "labels.csv").write_text("image,label\nmissing.png,circle\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_dataset(tmp_path)
    (tmp_path / "labels.csv").write_text("file,class\n")
    with pytest.raises(ValueError, match="header"):
        load_dataset(tmp_path)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        sample(np.random.default_rng(0), 16)
    with pytest.raises(ValueError, match="count"):
        generate_dataset(Path("unused"), 0)


def test_datasets_module_does_not_import_torch() -> None:
    code = ("import sys, visionserve.export, visionserve.export.datasets, visionserve.export.models; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0
