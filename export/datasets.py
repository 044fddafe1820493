"""The synthetic *shapes* data set, and the on-disk layout every data set uses.

Layout (a real data set in the same layout works everywhere a generated one does)::

    DIR/images/<stem>.png     RGB image
    DIR/masks/<stem>.png      8-bit single-channel index mask (0 = background)
    DIR/labels.csv            header ``image,label``; label = class name
    DIR/classes.json          {"segmentation": [...], "classification": [...]}

Each generated image holds one dominant shape (circle, square or triangle) and up to
two smaller distractors on a textured background. The classification label is the
shape class with the largest visible area; images are resampled until that class is
clearly larger (>= ``DOMINANCE`` x) than the next class, so the label is learnable.

This module must not import torch: the server tests use it (numpy + OpenCV only).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

SEGMENTATION_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle")
CLASSIFICATION_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
DOMINANCE = 1.5  # largest visible class area / next class area, at least
_MIN_DOMINANT_FRACTION = 0.06  # dominant shape covers at least this share of the image
_MAX_TRIES = 100


class Example(NamedTuple):
    """One entry of a data set on disk: unpacks as ``(image_path, mask_path, label)``."""

    image: Path
    mask: Path
    label: str


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    """An RGB colour at least a visible distance away from ``avoid``."""
    for _ in range(50):
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        if avoid is None or np.linalg.norm(colour - avoid) > 90:
            return colour
    return 255.0 - avoid  # type: ignore[operator]


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background: base colour, linear gradient and noise. Returns (image, base)."""
    base = _random_colour(rng)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None] * rng.uniform(-50, 50, size=3)
    coarse = rng.normal(0, rng.uniform(5, 20), size=(size // 8, size // 8, 3)).astype(np.float32)
    coarse = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
    fine = rng.normal(0, rng.uniform(2, 10), size=(size, size, 3))
    return base + gradient + coarse + fine, base


def _shape_polygon(rng: np.random.Generator, kind: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Vertices of a square/rectangle (kind 2) or triangle (kind 3), randomly rotated."""
    theta = rng.uniform(0, 2 * np.pi)
    if kind == 2:
        aspect = rng.uniform(0.75, 1.0)
        half = r / np.sqrt(1 + aspect**2) * np.sqrt(2)
        pts = np.array([[-half, -half * aspect], [half, -half * aspect],
                        [half, half * aspect], [-half, half * aspect]])
    else:
        angles = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        pts = np.stack([np.cos(angles), np.sin(angles)], axis=1) * r
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return (pts @ rot.T + [cx, cy]).round().astype(np.int32)


def _draw_shape(rng: np.random.Generator, size: int, kind: int, radius: float) -> np.ndarray:
    """A boolean footprint of one shape of class ``kind`` (1..3) with circumradius ``radius``."""
    canvas = np.zeros((size, size), np.uint8)
    margin = radius * 0.6
    cx, cy = rng.uniform(margin, size - margin, size=2)
    if kind == 1:
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(radius * 0.85)), 1, -1)  # noqa: RUF046
    else:
        cv2.fillPoly(canvas, [_shape_polygon(rng, kind, cx, cy, radius)], 1)
    return canvas.astype(bool)


def _layout(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """Shapes in drawing order as (footprint, class) and the resulting index mask."""
    dominant = int(rng.integers(1, 4))
    shapes = [(_draw_shape(rng, size, dominant, size * rng.uniform(0.22, 0.38)), dominant)]
    for _ in range(int(rng.integers(0, 3))):
        kind = int(rng.integers(1, 4))
        shapes.append((_draw_shape(rng, size, kind, size * rng.uniform(0.08, 0.17)), kind))
    order = rng.permutation(len(shapes))  # distractors may lie under or over the dominant
    shapes = [shapes[i] for i in order]
    mask = np.zeros((size, size), np.uint8)
    for footprint, kind in shapes:
        mask[footprint] = kind
    return mask, shapes


def label_from_mask(mask: np.ndarray) -> tuple[int, float]:
    """(classification index, dominance ratio) of an index mask: the largest visible shape class.

    The dominance ratio is the largest class area over the next class area (inf if alone).
    """
    areas = np.bincount(mask.ravel(), minlength=len(SEGMENTATION_CLASSES))[1:len(SEGMENTATION_CLASSES)]
    order = np.argsort(areas)[::-1]
    first, second = float(areas[order[0]]), float(areas[order[1]])
    return int(order[0]), (first / second if second > 0 else float("inf"))


def sample(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray, int]:
    """One example: (RGB uint8 HxWx3 image, uint8 HxW index mask, classification index).

    The classification index counts from 0 over ``CLASSIFICATION_CLASSES`` (mask value - 1).
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    for _ in range(_MAX_TRIES):
        mask, shapes = _layout(rng, size)
        label, ratio = label_from_mask(mask)
        if ratio >= DOMINANCE and (mask == label + 1).mean() >= _MIN_DOMINANT_FRACTION:
            break
    else:  # pragma: no cover - the acceptance rate is far above 1 %
        raise RuntimeError(f"could not sample a shapes image with a dominant class in {_MAX_TRIES} tries")
    image, base = _background(rng, size)
    for footprint, _kind in shapes:
        colour = _random_colour(rng, avoid=base)
        texture = rng.normal(0, rng.uniform(2, 14), size=(size, size, 3))
        image[footprint] = (colour + texture)[footprint]
    image = cv2.GaussianBlur(image.astype(np.float32), (3, 3), rng.uniform(0.1, 0.8))
    return np.clip(image, 0, 255).round().astype(np.uint8), mask, label


def write_classes(out_dir: Path) -> None:
    """Write ``classes.json`` for the shapes data set."""
    classes = {"segmentation": list(SEGMENTATION_CLASSES), "classification": list(CLASSIFICATION_CLASSES)}
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=2) + "\n", encoding="utf-8")


def generate_dataset(out_dir: Path, count: int, *, size: int = 96, seed: int = 0,
                     progress: bool = False) -> Path:
    """Write ``count`` generated examples under ``out_dir`` (same seed -> identical files)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in tqdm(range(count), desc="generate", unit="img", disable=not progress):
        image, mask, label = sample(rng, size)
        stem = f"shape_{index:05d}"
        _write_png(out_dir / "images" / f"{stem}.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        _write_png(out_dir / "masks" / f"{stem}.png", mask)
        rows.append((f"{stem}.png", CLASSIFICATION_CLASSES[label]))
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    write_classes(out_dir)
    logger.info("wrote %d examples (%dx%d, seed %d) to %s", count, size, size, seed, out_dir)
    return out_dir


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(encoded.tobytes())


def load_classes(data_dir: Path) -> dict[str, list[str]]:
    """The ``classes.json`` of a data set directory."""
    path = Path(data_dir) / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a data set directory needs classes.json "
                                '({"segmentation": [...], "classification": [...]})')
    classes = json.loads(path.read_text(encoding="utf-8"))
    for key in ("segmentation", "classification"):
        if not isinstance(classes.get(key), list) or len(classes[key]) < 2:
            raise ValueError(f"{path}: {key!r} must list at least 2 class names, got {classes.get(key)!r}")
    return classes


def load_dataset(data_dir: Path) -> list[Example]:
    """The examples listed in ``DIR/labels.csv``, with paths checked to exist."""
    data_dir = Path(data_dir)
    labels_csv = data_dir / "labels.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv} not found: expected a data set directory with "
                                "images/, masks/, labels.csv and classes.json")
    with open(labels_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{labels_csv}: header must be 'image,label', got {reader.fieldnames}")
        rows = list(reader)
    examples = []
    for row in rows:
        image = data_dir / "images" / row["image"]
        mask = data_dir / "masks" / (Path(row["image"]).stem + ".png")
        if not image.is_file():
            raise FileNotFoundError(f"{labels_csv} lists {row['image']} but {image} does not exist")
        examples.append(Example(image=image, mask=mask, label=row["label"]))
    if not examples:
        raise ValueError(f"{labels_csv} lists no images")
    return examples


def read_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 HxWx3."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"could not decode image {path} (expected a PNG or JPEG file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """An index mask file as uint8 HxW."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"could not decode mask {path} (expected an 8-bit single-channel PNG)")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask {path} must be 8-bit single-channel, got shape {mask.shape} {mask.dtype}")
    return mask
