"""The model repository on disk (Triton-like).

    REPO/<name>/model.yaml            ModelConfig
    REPO/<name>/<version>/model.onnx  versions are positive integers; highest = latest

Model names are checked against ``MODEL_NAME_RE`` before any path is built from them.
"""

from __future__ import annotations

import logging
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from visionserve.server.errors import InvalidArgument, NotFound
from visionserve.server.model_config import ModelConfig

log = logging.getLogger(__name__)

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
CONFIG_FILE = "model.yaml"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model.fp16.onnx"
ONNX_FILES = {"fp32": ONNX_FILE, "fp16": ONNX_FP16_FILE}  # by model.yaml `precision`


@dataclass(frozen=True)
class ModelEntry:
    """One version of one model, as found on disk."""

    name: str
    version: int
    config: ModelConfig
    directory: Path  # REPO/<name>/<version>

    @property
    def onnx_path(self) -> Path:
        """The ONNX model the ONNX Runtime backends serve: model.onnx, or model.fp16.onnx
        for ``precision: fp16``."""
        return self.directory / ONNX_FILES[self.config.precision]


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ``InvalidArgument``."""
    if not MODEL_NAME_RE.fullmatch(name or ""):
        raise InvalidArgument(
            f"invalid model name {name!r}: expected 1-128 characters from [A-Za-z0-9._-], "
            f"starting with a letter or digit"
        )
    return name


def parse_version(version: str) -> int | None:
    """``""`` -> None (latest); ``"3"`` -> 3; anything else -> ``InvalidArgument``."""
    if version == "":
        return None
    if not VERSION_RE.fullmatch(version):
        raise InvalidArgument(
            f"invalid version {version!r}: expected a positive integer, or empty for the latest"
        )
    return int(version)


class ModelRepository:
    """Read-only view of a repository directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")

    def model_names(self) -> list[str]:
        """Sorted names of the directories holding a model.yaml (others are skipped)."""
        names = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or not (child / CONFIG_FILE).is_file():
                continue
            if not MODEL_NAME_RE.fullmatch(child.name):
                log.warning("skipping %s: %r is not a valid model name", child, child.name)
                continue
            names.append(child.name)
        return names

    def versions(self, name: str) -> list[int]:
        """Ascending versions of ``name`` that have a model file."""
        model_dir = self._model_dir(name)
        return sorted(
            int(child.name)
            for child in model_dir.iterdir()
            if child.is_dir() and VERSION_RE.fullmatch(child.name) and (child / ONNX_FILE).is_file()
        )

    def config(self, name: str) -> ModelConfig:
        """The parsed model.yaml of ``name`` (``ValueError`` naming the file if it is wrong)."""
        path = self._model_dir(name) / CONFIG_FILE
        config = ModelConfig.load(path)
        if config.name != name:
            log.warning(
                "%s says name %r; serving it as %r (the directory name)", path, config.name, name
            )
        return config

    def entry(self, name: str, version: str = "") -> ModelEntry:
        """The entry for ``name`` at ``version`` (empty: the latest)."""
        wanted = parse_version(version)
        available = self.versions(name)
        if not available:
            raise NotFound(
                f"model {name!r} has no versions: expected {self.root}/{name}/<N>/{ONNX_FILE}"
            )
        if wanted is None:
            wanted = available[-1]
        elif wanted not in available:
            raise NotFound(
                f"model {name!r} has no version {wanted}: available versions are "
                f"{', '.join(map(str, available))}"
            )
        return ModelEntry(name, wanted, self.config(name), self._model_dir(name) / str(wanted))

    def entries(self) -> list[ModelEntry]:
        """Every version of every model."""
        return [
            self.entry(name, str(v)) for name in self.model_names() for v in self.versions(name)
        ]

    def model_files(self, name: str) -> tuple[tuple[str, int, int], ...]:
        """``(path, mtime_ns, size)`` of model.yaml and of every file in the model's
        folders: what changes when its files are edited, added, removed or replaced."""
        model_dir = self._model_dir(name)
        found = []
        for path in [model_dir / CONFIG_FILE, *sorted(model_dir.glob("*/*"))]:
            try:
                info = path.stat()
            except OSError:  # removed meanwhile
                continue
            if stat.S_ISREG(info.st_mode):
                relative = path.relative_to(model_dir).as_posix()
                found.append((relative, info.st_mtime_ns, info.st_size))
        return tuple(found)

    def _model_dir(self, name: str) -> Path:
        check_model_name(name)
        model_dir = self.root / name
        if not (model_dir / CONFIG_FILE).is_file():
            available = ", ".join(self.model_names()) or "none"
            raise NotFound(f"unknown model {name!r}: available models are {available}")
        return model_dir
