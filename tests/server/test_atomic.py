"""The one atomic-write helper: whole files or none, no temporary file left behind."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from visionserve.server.atomic import PARTIAL_SUFFIX, partial_path, remove_partials, write_atomic


def test_writes_replace_whole_files_and_leave_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "new/folder/file.bin"
    write_atomic(target, b"one")
    write_atomic(target, "two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["file.bin"]


def test_files_get_the_usual_permissions_not_private_ones(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "model.yaml", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.yaml").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):  # the rename fails: the target is a folder
        write_atomic(tmp_path / "folder", b"data")
    target = tmp_path / "file"
    write_atomic(target, b"old")

    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_concurrent_writers_of_one_file_never_mix(tmp_path: Path) -> None:
    target = tmp_path / "file"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=write_atomic, args=(target, p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_remove_partials_removes_those_of_killed_writers_only(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-write leaves its partial file; a rerun's
    remove_partials removes it, and leaves a live writer's alone."""
    killed = tmp_path / "masks/a/img.png"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from visionserve.server import atomic\n"
        "target = Path(sys.argv[1])\n"
        "real = os.replace\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed before the rename\n"
        "atomic.write_atomic(target, b'half')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(killed)], timeout=60)
    assert result.returncode == -9
    left = list((tmp_path / "masks").rglob(f"*{PARTIAL_SUFFIX}"))
    assert len(left) == 1 and left[0].read_bytes() == b"half" and not killed.exists()
    live = partial_path(tmp_path / "masks/b.png")  # this process: still running
    live.write_bytes(b"being written")
    other = tmp_path / "masks/.notes.partial"  # not one of ours
    other.write_bytes(b"")
    assert remove_partials(tmp_path / "masks") == 1
    assert not left[0].exists() and live.exists() and other.exists()
    assert remove_partials(tmp_path / "missing") == 0
