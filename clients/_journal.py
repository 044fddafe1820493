"""The batch client's journal: one JSON line per finished image, appended, fsynced in groups.

An image is finished when its mask file exists (with the size the journal recorded)
and the journal records it. Each line is written to the operating system (``write`` +
flush) before the image counts as done, after its mask file was renamed into place, so
a run that is interrupted at any point (Ctrl-C, a killed server, a killed client)
leaves a journal whose complete lines are exactly the images done: the next run skips
them and the report is rebuilt without recomputing anything.

``fsync`` (surviving an operating-system crash or power loss, not just a killed
process) is batched: the journal is fsynced at most ``sync_interval`` seconds after a
line was written (by a flusher thread, and on close), not once per image. A crash of
the machine can therefore lose the last ``sync_interval`` seconds of lines (those
images are redone: masks are replaced atomically, never duplicated), and can leave a
recorded mask file empty or short (mask files are not fsynced): a record whose mask
file does not have the recorded ``bytes`` is not finished, so the image is redone. The
first line is a header naming the run's settings; a journal written with other
settings is refused.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_NAME = ".visionserve-journal.jsonl"
FORMAT = 1
SYNC_INTERVAL_S = 0.5


class JournalMismatch(ValueError):
    """The journal was written by a run with other settings (model, ground truth, ...)."""


class Journal:
    """Append-only record of finished images, keyed by their path relative to the input root."""

    def __init__(
        self, path: Path, settings: dict[str, Any], sync_interval: float = SYNC_INTERVAL_S
    ) -> None:
        if sync_interval < 0:
            raise ValueError(
                f"sync_interval must be >= 0 s (0: fsync every line), got {sync_interval}"
            )
        self.path = path
        self.settings = {"format": FORMAT, **settings}
        self.records: dict[str, dict[str, Any]] = {}
        self.sync_interval = sync_interval
        self.syncs = 0
        self._lock = threading.Lock()
        self._fh = None
        self._dirty = threading.Event()
        self._closing = threading.Event()
        self._flusher: threading.Thread | None = None
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
            self._sync()
        if self.sync_interval > 0:
            self._closing.clear()
            self._flusher = threading.Thread(
                target=self._flush_loop, daemon=True, name="journal-fsync"
            )
            self._flusher.start()
        return self

    def close(self) -> None:
        """Stop the flusher, fsync what is left, close the file."""
        if self._flusher is not None:
            self._closing.set()
            self._dirty.set()
            self._flusher.join()
            self._flusher = None
        if self._fh is not None:
            self._sync()
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finished(self, key: str, mask: Path) -> bool:
        """Done in an earlier run: recorded here and its mask is on disk (with the
        recorded size, when the record has one: a crash can leave a short file)."""
        record = self.records.get(key)
        if record is None:
            return False
        try:
            info = mask.stat()
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and record.get("bytes", info.st_size) == info.st_size

    def append(self, record: dict[str, Any]) -> None:
        """Record one finished image (``record["key"]``): written to the OS before it
        returns (a killed process loses nothing), fsynced within ``sync_interval``.

        One complete line per write, under a lock, so a kill can tear only the last."""
        with self._lock:
            self._write(record)
            self.records[record["key"]] = record
        if self.sync_interval == 0:
            self._sync()
        else:
            self._dirty.set()

    def _write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            raise RuntimeError(f"journal {self.path} is not open")
        self._fh.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._fh.flush()

    def _sync(self) -> None:
        os.fsync(self._fh.fileno())
        self.syncs += 1

    def _flush_loop(self) -> None:
        """fsync at most every ``sync_interval`` seconds while lines keep coming."""
        while not self._closing.is_set():
            self._dirty.wait()
            if self._closing.is_set():
                return  # close() does the last fsync
            self._dirty.clear()
            started = time.monotonic()
            try:
                self._sync()
            except (OSError, ValueError, AttributeError) as exc:  # closed under us
                log.warning("journal fsync failed: %s", exc)
            self._closing.wait(max(0.0, self.sync_interval - (time.monotonic() - started)))
