"""argparse value types shared by the subcommands: bad values fail at parse time."""

from __future__ import annotations

import argparse
from pathlib import Path

from visionserve.server.settings_spec import comma_list  # one home: settings split lists so too


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return number


def existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value} is not a file")
    return path


def existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a folder")
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a long a,b,c,... list is too long a file name
        return False


def labels(value: str) -> list[str]:
    """Class names: a file (one per line, or a JSON list) or a comma-separated list."""
    path = Path(value)
    if _is_file(path):
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            import json

            try:
                names = json.loads(text)
            except json.JSONDecodeError as exc:
                raise argparse.ArgumentTypeError(f"{value}: not valid JSON ({exc})") from exc
            if not isinstance(names, list):
                raise argparse.ArgumentTypeError(f"{value}: expected a JSON list of class names")
        else:
            names = text.splitlines()
    elif "," in value:
        names = list(comma_list(value))
    else:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a labels file nor a comma-separated list (a,b,c)")
    names = [str(n).strip() for n in names if str(n).strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 class names, got {names}")
    return names


def size(value: str) -> tuple[int, int]:
    """``HxW`` (or one number for a square) -> (height, width)."""
    parts = value.lower().split("x")
    try:
        height, width = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        height = width = 0
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"expected HxW like 224x224 (or 224), got {value!r}")
    return height, width


def triple(value: str) -> list[float]:
    """Three comma-separated floats (R, G, B): --mean 0.485,0.456,0.406."""
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers (R,G,B), got {value!r}")
    return numbers
