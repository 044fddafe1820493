"""Finding input images and their ground truth on disk; writing outputs atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def find_images(root: Path) -> list[Path]:
    """Every image file below ``root`` (recursive), sorted; ``root`` may be one file."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} is neither a folder nor a file")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def match_ground_truth(images: list[Path], root: Path, gt_root: Path) -> dict[Path, Path | None]:
    """Each image's ground truth: the same relative path under ``gt_root`` (any image suffix),
    else a unique file of the same stem anywhere under it."""
    if not gt_root.is_dir():
        raise FileNotFoundError(f"--gt {gt_root} is not a folder")
    by_stem: dict[str, list[Path]] = {}
    for path in find_images(gt_root):
        by_stem.setdefault(path.stem, []).append(path)
    matched: dict[Path, Path | None] = {}
    for image in images:
        rel = relative_name(image, root)
        same_place = [p for p in by_stem.get(image.stem, []) if p.relative_to(gt_root).with_suffix("") == rel.with_suffix("")]
        candidates = same_place or by_stem.get(image.stem, [])
        matched[image] = candidates[0] if len(candidates) == 1 else None
    return matched


def relative_name(image: Path, root: Path) -> Path:
    """``image`` relative to the input root (just its name when the input was one file)."""
    return image.relative_to(root) if image.is_relative_to(root) and image != root else Path(image.name)


def output_path(image: Path, root: Path, out_dir: Path, suffix: str = ".png") -> Path:
    return (out_dir / relative_name(image, root)).with_suffix(suffix)


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
