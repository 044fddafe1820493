"""The batch journal: durable appends, torn last lines, settings checks; and input resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visionserve.clients import confusion_matrix, iou_from_confusion
from visionserve.clients._files import resolve_inputs
from visionserve.clients._journal import Journal, JournalMismatch

SETTINGS = {"model": "m", "version": "1"}


def test_records_survive_reopening_and_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path, SETTINGS) as journal:
        journal.append({"key": "a.png", "miou": 0.5})
        journal.append({"key": "b.png", "miou": 0.7})
    with open(path, "ab") as fh:
        fh.write(b'{"key": "c.png", "mi')  # killed mid-write
    mask = tmp_path / "a.png"
    mask.write_bytes(b"x")
    journal = Journal(path, SETTINGS)
    assert set(journal.records) == {"a.png", "b.png"}
    assert journal.finished("a.png", mask) and not journal.finished("b.png", tmp_path / "b.png")
    assert path.read_bytes().endswith(b"}\n")  # the torn tail is gone, appends start clean
    with journal:
        journal.append({"key": "c.png", "miou": 0.9})
    assert [json.loads(line).get("key") for line in path.read_text().splitlines()] == [
        None,
        "a.png",
        "b.png",
        "c.png",
    ]


def test_lines_reach_the_file_at_once_and_fsyncs_are_grouped(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal(path, SETTINGS, sync_interval=0.5).open()
    try:
        for i in range(200):
            journal.append({"key": f"{i}.png"})
        # A process killed now loses nothing: every line is already in the file.
        assert len(Journal(path, SETTINGS).records) == 200
        assert journal.syncs <= 3, "one fsync per 0.5 s, not one per line"
    finally:
        journal.close()
    assert journal.syncs >= 2  # the header, and what close() found unsynced


def test_sync_interval_zero_fsyncs_every_line(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.jsonl", SETTINGS, sync_interval=0) as journal:
        for i in range(5):
            journal.append({"key": f"{i}.png"})
        assert journal.syncs == 6  # header + 5 lines
    with pytest.raises(ValueError, match="sync_interval"):
        Journal(tmp_path / "k.jsonl", SETTINGS, sync_interval=-1)


def test_a_mask_of_another_size_than_recorded_is_not_finished(tmp_path: Path) -> None:
    mask = tmp_path / "a.png"
    mask.write_bytes(b"12345")
    with Journal(tmp_path / "j.jsonl", SETTINGS) as journal:
        journal.append({"key": "a.png", "bytes": 5})
        journal.append({"key": "b.png", "bytes": 5})
    journal = Journal(tmp_path / "j.jsonl", SETTINGS)
    assert journal.finished("a.png", mask)
    mask.write_bytes(b"")  # a crash of the machine left it empty: redo the image
    assert not journal.finished("a.png", mask)
    assert not journal.finished("b.png", tmp_path / "b.png")


def test_a_journal_of_other_settings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path, SETTINGS) as journal:
        journal.append({"key": "a.png"})
    with pytest.raises(JournalMismatch, match="--restart"):
        Journal(path, {**SETTINGS, "model": "other"})


def test_append_needs_open(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        Journal(tmp_path / "j.jsonl", SETTINGS).append({"key": "a"})


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_resolve_folder_glob_image_and_list(tmp_path: Path) -> None:
    a, b = touch(tmp_path / "in/x/a.png"), touch(tmp_path / "in/y/b.jpg")
    touch(tmp_path / "in/notes.txt")
    assert resolve_inputs(str(tmp_path / "in")) == (tmp_path / "in", [a, b])
    assert resolve_inputs(str(tmp_path / "in/**/*.png")) == (tmp_path / "in", [a])
    assert resolve_inputs(str(a)) == (a.parent, [a])
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nin/x/a.png\n\n" + str(b) + "\n")
    assert resolve_inputs(str(listing)) == (tmp_path / "in", [a, b])
    with pytest.raises(FileNotFoundError, match="not a folder, an image, a list file"):
        resolve_inputs(str(tmp_path / "missing"))


def test_confusion_matrix_rows_are_truth_and_ignore_is_left_out() -> None:
    truth = np.array([[0, 0, 1], [2, 255, 1]], np.uint8)
    pred = np.array([[0, 1, 1], [2, 0, 0]], np.uint8)
    cm = confusion_matrix(pred, truth, 3, 255)
    assert cm.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    inter, union, iou = iou_from_confusion(cm)
    assert inter.tolist() == [1, 1, 1] and union.tolist() == [3, 3, 1]
    assert iou.tolist() == [1 / 3, 1 / 3, 1.0]
    with pytest.raises(ValueError, match="class values 7 outside the valid range 0..2"):
        confusion_matrix(pred, np.full_like(truth, 7), 3, 255)
    with pytest.raises(ValueError, match="must be the same size"):
        confusion_matrix(pred, truth[:1], 3, 255)
