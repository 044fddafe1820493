"""Writer of model repository entries: ``REPO/<name>/model.yaml`` and ``REPO/<name>/<version>/...``.

A version directory appears complete or not at all: its files are written into a hidden
temporary directory (``.tmp-*``) beside it and renamed into place. Version directories are
positive integers; readers should skip names that are not. Names and versions follow the
server's rules (:func:`visionserve.server.repository.check_model_name`, ``VERSION_RE``), so
whatever is written can be served. Files are written mode 0644 and directories 0755: a server
running as another user can read them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from visionserve.server.model_config import ModelConfig
from visionserve.server.repository import VERSION_RE, check_model_name

logger = logging.getLogger(__name__)


def existing_versions(model_dir: Path) -> list[int]:
    """The version numbers present under ``model_dir`` (sorted)."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir()
                  if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def next_version(model_dir: Path) -> int:
    """One more than the highest version present (1 for a new model)."""
    return max(existing_versions(model_dir), default=0) + 1


FILE_MODE = 0o644
DIR_MODE = 0o755


def _check_name(name: str) -> None:
    check_model_name(name)  # the server's rule: what is written can be served


def write_model_config(repository: Path, config: ModelConfig) -> Path:
    """Write (atomically replace) ``REPO/<name>/model.yaml``."""
    _check_name(config.name)
    model_dir = Path(repository) / config.name
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "model.yaml"
    if path.is_file():
        old = ModelConfig.load(path)
        if old.task != config.task or old.labels != config.labels:
            logger.warning("%s: replacing task/labels %s %s with %s %s", path, old.task, list(old.labels),
                           config.task, list(config.labels))
    config.save(path)  # atomically
    return path


def write_version(repository: Path, name: str, files: Mapping[str, bytes], *,
                  version: int | None = None) -> Path:
    """Write ``files`` (file name -> content) as ``REPO/<name>/<version>/``; returns that directory.

    ``version`` defaults to the next free one; an existing version is never overwritten.
    """
    _check_name(name)
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else int(version)
    if not VERSION_RE.fullmatch(str(version)):
        raise ValueError(f"version must be an integer from 1 to 999999999, got {version}")
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose another --version "
                              f"(next free: {next_version(model_dir)}) or remove it")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        tmp.chmod(DIR_MODE)  # mkdtemp makes it private; a server may run as another user
        for file_name, content in files.items():
            if Path(file_name).name != file_name:
                raise ValueError(f"file names must be plain names, got {file_name!r}")
            (tmp / file_name).write_bytes(content)
            (tmp / file_name).chmod(FILE_MODE)
        os.rename(tmp, target)  # fails if another writer created the version meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s (%s)", target, ", ".join(files))
    return target


def write_repository_entry(repository: Path, config: ModelConfig, files: Mapping[str, bytes], *,
                           version: int | None = None) -> Path:
    """Write a version's files, then the model's ``model.yaml``; returns the version directory."""
    target = write_version(repository, config.name, files, version=version)
    write_model_config(repository, config)
    return target
