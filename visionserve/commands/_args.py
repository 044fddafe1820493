"""argparse value types shared by the subcommands: bad values fail at parse time."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def comma_list(value: str) -> tuple[str, ...]:
    """``a,b, c`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for item in value.split(",") if item.strip())
