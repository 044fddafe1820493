"""Atomic file writes: the one helper for the exporter, the engine builder and the clients.

:func:`write_atomic` writes a temporary file in the target's folder and renames it over
the target, so a reader (a server loading a model, a rerun checking its masks) sees the
old file or the new one, never half of one. The temporary file is
``.<name>.<pid>-<thread>.partial``: unique per process and thread (concurrent writers of
one target never share it), removed when the write fails, and, when the writer was killed
(kill -9, out of memory), recognisable: :func:`remove_partials` removes those of processes
that are no longer running, and the batch CLIs call it on their output folder at start.
Files get the usual permissions (0666 less the umask, 0644 typically), not mkstemp's 0600.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
_PARTIAL = re.compile(r"^\..+\.(\d+)-\d+" + re.escape(PARTIAL_SUFFIX) + "$")

log = logging.getLogger(__name__)


def partial_path(path: Path) -> Path:
    """The temporary file :func:`write_atomic` writes ``path`` through in this thread."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{PARTIAL_SUFFIX}")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically, creating its folder if needed."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = partial_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileNotFoundError:  # the folder's first file: create it (not per file)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_partials(folder: Path, *, recursive: bool = True) -> int:
    """Remove the temporary files of :func:`write_atomic` left in ``folder`` by processes
    that are no longer running (a kill -9 mid-write); returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(f".*{PARTIAL_SUFFIX}") if recursive else folder.glob(f".*{PARTIAL_SUFFIX}")
    removed = 0
    for path in found:
        match = _PARTIAL.match(path.name)
        if match and path.is_file() and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d partial file(s) of killed writers under %s", removed, folder)
    return removed
