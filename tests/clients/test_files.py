from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visionserve.clients import image_message, mask_message
from visionserve.clients._files import find_images, match_ground_truth, output_path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_images_recursive_and_sorted(tmp_path: Path) -> None:
    b = touch(tmp_path / "sub/b.JPG")
    a = touch(tmp_path / "a.png")
    touch(tmp_path / "notes.txt")
    assert find_images(tmp_path) == [a, b]
    assert find_images(a) == [a]
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        find_images(tmp_path / "missing")


def test_ground_truth_prefers_same_relative_path(tmp_path: Path) -> None:
    images = [
        touch(tmp_path / "in/x/cat.jpg"),
        touch(tmp_path / "in/dog.png"),
        touch(tmp_path / "in/eel.png"),
    ]
    same_place = touch(tmp_path / "gt/x/cat.png")
    touch(tmp_path / "gt/y/cat.png")
    elsewhere = touch(tmp_path / "gt/deep/dog.png")
    matched = match_ground_truth(images, tmp_path / "in", tmp_path / "gt")
    assert matched[images[0]] == same_place
    assert matched[images[1]] == elsewhere
    assert matched[images[2]] is None


def test_output_mirrors_input_tree(tmp_path: Path) -> None:
    out = output_path(tmp_path / "in/x/cat.jpg", tmp_path / "in", tmp_path / "out")
    assert out == tmp_path / "out/x/cat.png"


def test_messages_check_arrays() -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    msg = image_message(rgb)
    assert (msg.raw.height, msg.raw.width, msg.raw.channels) == (4, 5, 3)
    assert len(msg.raw.data) == 60
    with pytest.raises(ValueError, match="uint8"):
        image_message(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 HxW"):
        mask_message(rgb)
    with pytest.raises(ValueError, match="PNG"):
        mask_message(b"\xff\xd8 not a png")
