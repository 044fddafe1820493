"""Finding input images and their ground truth on disk."""

from __future__ import annotations

import glob
import os
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def find_images(root: Path) -> list[Path]:
    """Every image file below ``root`` (recursive), sorted; ``root`` may be one file."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} is neither a folder nor a file")
    # Broken links are listed too: they fail later with a reason, not silently.
    return sorted(
        p
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES
    )


GLOB_CHARS = set("*?[")


def resolve_inputs(spec: str) -> tuple[Path, list[Path]]:
    """``(root, images)`` from a folder (recursive), a glob, an image, or a list file.

    A list file (any non-image file, e.g. ``images.txt``) names one image per line,
    relative to the list file's folder unless absolute; blank lines and ``#`` comments
    are skipped. ``root`` is the folder outputs mirror: the folder itself, the glob's
    fixed prefix, or the deepest folder holding every listed image.
    """
    path = Path(spec)
    if GLOB_CHARS & set(spec) and not path.exists():
        fixed = (
            Path(*[part for part in path.parts[: _first_glob_part(path)]])
            if path.parts
            else Path(".")
        )
        images = sorted(
            Path(p)
            for p in glob.glob(spec, recursive=True)
            if Path(p).suffix.lower() in IMAGE_SUFFIXES and not Path(p).is_dir()
        )
        return (fixed if str(fixed) else Path(".")), images
    if path.is_dir():
        return path, find_images(path)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return path.parent, [path]
    if path.is_file():
        return _read_list(path)
    raise FileNotFoundError(
        f"input {spec!r} is not a folder, an image, a list file or a matching glob"
    )


def _first_glob_part(path: Path) -> int:
    return next(i for i, part in enumerate(path.parts) if GLOB_CHARS & set(part))


def _read_list(list_file: Path) -> tuple[Path, list[Path]]:
    images = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            images.append(p if p.is_absolute() else list_file.parent / p)
    if not images:
        return list_file.parent, []
    root = Path(os.path.commonpath([str(p.parent.absolute()) for p in images]))
    return root, [p.absolute() for p in images]


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
        same_place = [
            p
            for p in by_stem.get(image.stem, [])
            if p.relative_to(gt_root).with_suffix("") == rel.with_suffix("")
        ]
        candidates = same_place or by_stem.get(image.stem, [])
        matched[image] = candidates[0] if len(candidates) == 1 else None
    return matched


def relative_key(image: Path, root: Path) -> str:
    """The image's journal key: its path relative to the input root, with ``/``."""
    return relative_name(image, root).as_posix()


def relative_name(image: Path, root: Path) -> Path:
    """``image`` relative to the input root (just its name when the input was one file)."""
    return (
        image.relative_to(root)
        if image.is_relative_to(root) and image != root
        else Path(image.name)
    )


def output_path(image: Path, root: Path, out_dir: Path, suffix: str = ".png") -> Path:
    return (out_dir / relative_name(image, root)).with_suffix(suffix)
