"""The batch client's journal: one JSON line per finished image, appended and fsynced.

An image is finished when its mask file exists and the journal records it; a run that
is interrupted at any point (Ctrl-C, a killed server, a killed client) leaves a journal
whose complete lines are exactly the images done, so the next run skips them and the
report can be rebuilt without recomputing anything. The first line is a header naming
the run's settings; a journal written with other settings is refused.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_NAME = ".visionserve-journal.jsonl"
FORMAT = 1


class JournalMismatch(ValueError):
    """The journal was written by a run with other settings (model, ground truth, ...)."""


class Journal:
    """Append-only record of finished images, keyed by their path relative to the input root."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = {"format": FORMAT, **settings}
        self.records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._fh = None
        if path.exists():
            self._load()

    def _load(self) -> None:
        *complete, tail = self.path.read_bytes().split(b"\n")
        if tail:  # a kill during the last write: that image is redone
            log.warning("%s ends in an incomplete line: that image will be redone", self.path)
            with open(self.path, "rb+") as fh:
                fh.truncate(self.path.stat().st_size - len(tail))
        if not complete:
            return
        try:
            found = json.loads(complete[0]).get("settings")
        except (json.JSONDecodeError, AttributeError):
            found = None
        if found != self.settings:
            raise JournalMismatch(
                f"{self.path} was written by a run with settings {found}, this run has "
                f"{self.settings}: use another --out folder, or --restart to start over"
            )
        for number, line in enumerate(complete[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{self.path} line {number} is not JSON ({exc}): "
                    f"the journal was edited or damaged; use --restart"
                ) from exc
            self.records[record["key"]] = record

    def open(self) -> Journal:
        """Open for appending (writes the header of a new journal)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "ab")
        if new:
            self._write({"settings": self.settings})
        return self

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finished(self, key: str, mask: Path) -> bool:
        """Done in an earlier run: recorded here and its mask is on disk."""
        return key in self.records and mask.is_file()

    def append(self, record: dict[str, Any]) -> None:
        """Record one finished image (``record["key"]``), durable before it returns.

        Lines are written under a lock; the fsync is not, so concurrent appends share
        the disk flush (one complete line per write, so a kill can tear only the last)."""
        with self._lock:
            self._write(record, sync=False)
            self.records[record["key"]] = record
            fd = self._fh.fileno()
        os.fsync(fd)

    def _write(self, record: dict[str, Any], sync: bool = True) -> None:
        if self._fh is None:
            raise RuntimeError(f"journal {self.path} is not open")
        self._fh.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._fh.flush()
        if sync:
            os.fsync(self._fh.fileno())
