"""The CPU quota of this process's control group (Linux cgroup v2 or v1), in cores.

A container given ``--cpus 2`` (Docker) or ``resources.limits.cpu: 2`` (Kubernetes) still
sees every core of its node in its affinity mask; only its cgroup says that it may use
two of them per scheduling period. Thread pools sized to the node's 32 or 64 cores would
then be throttled by the kernel for most of each period. ``cpu_quota_cores`` reads the
quota the way the kernel applies it: the tightest of the process's cgroup and of every
ancestor visible in its mount (a pod's limit sits on the pod's cgroup, the container's
on its own). None where no quota is set or none can be read (not Linux, no cgroup
mount): nothing else is assumed.
"""

from __future__ import annotations

from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
CGROUP = Path("/proc/self/cgroup")


def cpu_quota_cores(mountinfo: Path = MOUNTINFO, cgroup: Path = CGROUP) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in cores."""
    try:
        mounts = mountinfo.read_text()
        groups = cgroup.read_text()
    except OSError:
        return None
    quotas = []
    for version, mount_point, mount_root in cpu_mounts(mounts):
        path = _group_path(groups, version)
        if path is None:
            continue
        directory = _directory(Path(mount_point), mount_root, path)
        read = _quota_v2 if version == 2 else _quota_v1
        quotas += [q for q in map(read, _up_to(directory, Path(mount_point))) if q]
    return min(quotas) if quotas else None


def cpu_mounts(mounts: str) -> list[tuple[int, str, str]]:
    """(cgroup version, mount point, the cgroup path its root is) of each cgroup mount
    that can hold a CPU quota: cgroup2, or a v1 hierarchy with the ``cpu`` controller."""
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if len(fields) < dash + 4 or dash < 5:
            continue
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup2":
            found.append((2, _unescape(fields[4]), fields[3]))
        elif fstype == "cgroup" and "cpu" in options:
            found.append((1, _unescape(fields[4]), fields[3]))
    return found


def _group_path(groups: str, version: int) -> str | None:
    """This process's cgroup path in the v2 hierarchy, or in the v1 ``cpu`` one."""
    for line in groups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if version == 2 and parts[0] == "0" and parts[1] == "":
            return parts[2]
        if version == 1 and "cpu" in parts[1].split(","):
            return parts[2]
    return None


def _directory(mount_point: Path, mount_root: str, path: str) -> Path:
    """Where ``path`` (as /proc/self/cgroup names it) lies under a mount of ``mount_root``."""
    if path == mount_root or path.startswith(mount_root.rstrip("/") + "/"):
        path = path[len(mount_root.rstrip("/")) :]
    return mount_point / path.lstrip("/")


def _up_to(directory: Path, top: Path) -> list[Path]:
    """``directory`` and its parents up to ``top`` (the mount point), those that exist."""
    chain = []
    while True:
        if directory.is_dir():
            chain.append(directory)
        if directory == top or top not in directory.parents:
            return chain
        directory = directory.parent


def _quota_v2(directory: Path) -> float | None:
    """``cpu.max``: "max 100000" (none) or "QUOTA PERIOD" in microseconds."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _quota_v1(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _unescape(field: str) -> str:
    """mountinfo escapes spaces, tabs, newlines and backslashes as octal (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
