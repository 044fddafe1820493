"""The server's thread pools follow a container's CPU limit, not its node's core count.

Each case writes the files the kernel shows (``/proc/self/mountinfo``, ``/proc/self/cgroup``
and a cgroup tree with ``cpu.max`` or ``cpu.cfs_*``) and reads them back as the server
does; one test puts a real process in a real cgroup v1 ``cpu`` hierarchy with a quota
(where this machine lets root create one) and checks the sizes the server picks there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from visionserve.server.cgroup_cpu import cpu_mounts, cpu_quota_cores

V2_MOUNT = "30 23 0:26 {root} {point} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"
V1_MOUNTS = (
    "31 25 0:27 {root} {point} rw,nosuid - cgroup cgroup rw,cpu\n"
    "32 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory"
)


def _v2(tmp_path: Path, quotas: dict[str, str], path: str, root: str = "/") -> float | None:
    """A cgroup2 mount at tmp_path/cg whose root is ``root``; the process in ``path``;
    ``quotas``: cpu.max of each directory (relative to the mount point)."""
    point = tmp_path / "cg"
    for directory, value in quotas.items():
        (point / directory).mkdir(parents=True, exist_ok=True)
        (point / directory / "cpu.max").write_text(value + "\n")
    (tmp_path / "mountinfo").write_text(V2_MOUNT.format(root=root, point=point) + "\n")
    (tmp_path / "cgroup").write_text(f"0::{path}\n")
    return cpu_quota_cores(tmp_path / "mountinfo", tmp_path / "cgroup")


def test_a_containers_own_limit(tmp_path: Path) -> None:
    assert _v2(tmp_path, {".": "max 100000"}, "/") is None
    assert _v2(tmp_path, {".": "200000 100000"}, "/") == 2.0


def test_the_tightest_of_the_group_and_its_ancestors(tmp_path: Path) -> None:
    quotas = {".": "max 100000", "kubepods": "max 100000", "kubepods/pod1": "300000 100000",
              "kubepods/pod1/ctr": "150000 100000"}  # fmt: skip
    assert _v2(tmp_path, quotas, "/kubepods/pod1/ctr") == 1.5
    quotas["kubepods/pod1/ctr"] = "max 100000"  # only the pod's limit
    assert _v2(tmp_path / "b", quotas, "/kubepods/pod1/ctr") == 3.0


def test_a_mount_whose_root_is_the_containers_group(tmp_path: Path) -> None:
    """Without a cgroup namespace the mount's root is the group itself."""
    assert _v2(tmp_path, {".": "50000 100000"}, "/docker/abc", root="/docker/abc") == 0.5


def test_cgroup_v1_quota_and_period(tmp_path: Path) -> None:
    point = tmp_path / "cpu"
    (point / "grp").mkdir(parents=True)
    (point / "grp" / "cpu.cfs_quota_us").write_text("250000\n")
    (point / "grp" / "cpu.cfs_period_us").write_text("100000\n")
    (point / "cpu.cfs_quota_us").write_text("-1\n")
    (point / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "mountinfo").write_text(V1_MOUNTS.format(root="/", point=point) + "\n")
    (tmp_path / "cgroup").write_text("4:memory:/grp\n1:cpu,cpuacct:/grp\n0::/\n")
    assert cpu_quota_cores(tmp_path / "mountinfo", tmp_path / "cgroup") == 2.5
    (tmp_path / "cgroup").write_text("1:cpu,cpuacct:/\n")
    assert cpu_quota_cores(tmp_path / "mountinfo", tmp_path / "cgroup") is None


def test_nothing_readable_means_no_limit(tmp_path: Path) -> None:
    assert cpu_quota_cores(tmp_path / "missing", tmp_path / "missing") is None
    (tmp_path / "mountinfo").write_text("garbage\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    assert cpu_quota_cores(tmp_path / "mountinfo", tmp_path / "cgroup") is None


def _v1_cpu_hierarchy() -> Path | None:
    """A cgroup v1 ``cpu`` hierarchy mounted at its root (where a test may add a group)."""
    for version, point, root in cpu_mounts(Path("/proc/self/mountinfo").read_text()):
        if version == 1 and root == "/":
            return Path(point)
    return None


def test_a_real_process_in_a_cgroup_with_a_one_core_quota() -> None:
    hierarchy = _v1_cpu_hierarchy()
    if len(os.sched_getaffinity(0)) < 2 or hierarchy is None or not os.access(hierarchy, os.W_OK):
        pytest.skip("needs 2+ cores and a writable cgroup v1 cpu hierarchy (root)")
    group = hierarchy / f"visionserve-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text(str(int((group / "cpu.cfs_period_us").read_text())))
        code = (
            "from visionserve.server.cores import usable_cores\n"
            "from visionserve.server.settings import ServerSettings\n"
            "from visionserve.server.backends.registry import auto_threads\n"
            "print(usable_cores(), ServerSettings('.').cpu_workers(), auto_threads(1))"
        )
        script = f'echo $$ > "{group}/cgroup.procs" && exec "{sys.executable}" -c "$0"'
        run = {"capture_output": True, "text": True, "timeout": 60, "check": False}
        inside = subprocess.run(["sh", "-c", script, code], **run)  # noqa: PLW1510
        outside = subprocess.run([sys.executable, "-c", code], **run)  # noqa: PLW1510
    finally:
        group.rmdir()
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.split() == ["1", "1", "1"]
    assert outside.stdout.split() == [str(len(os.sched_getaffinity(0)))] * 3
