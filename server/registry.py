"""Every loaded version of every model, with atomic swaps.

``sync`` brings the loaded models in line with the repository on disk: versions that
are new or whose files changed are loaded and warmed up *first*, then the model's
version table is replaced in one assignment (requests after it see the new table),
and the versions that left it are retired: they finish the requests they hold, then
close. A model that fails to load does not stop the others: its previous versions keep
serving (or, with none, it is NOT_SERVING and requests for it are told why), the reason
is logged once, and it is tried again only when its files change (``strict`` loads, the
KServe RepositoryModelLoad, always try and raise the error instead).

Requests hold a model with ``with registry.use(name, version) as model:``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from visionserve.server.batcher import BatchObserver
from visionserve.server.errors import NotFound, Unavailable
from visionserve.server.metrics import Metrics
from visionserve.server.repository import (
    ModelEntry,
    ModelRepository,
    check_model_name,
    parse_version,
)
from visionserve.server.admission import AdmissionPolicy
from visionserve.server.backends.registry import load_backend
from visionserve.server.requests import RequestLimits
from visionserve.server.served_model import ServedModel
from visionserve.server.tiling import tiling_caveat

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadFailure:
    """Why a model did not load, and the files it was loaded from (see ``model_files``)."""

    reason: str
    files: tuple[tuple[str, int, int], ...]


def signature(entry: ModelEntry) -> tuple[int, ...]:
    """What identifies the files of one version: mtimes and sizes of model.yaml and the model."""
    config = entry.directory.parent / "model.yaml"
    stats = [p.stat() for p in (config, entry.onnx_path) if p.exists()]  # fp16: maybe not yet
    return tuple(v for s in stats for v in (s.st_mtime_ns, s.st_size))


def load_model(
    entry: ModelEntry,
    *,
    overrides: Mapping[str, Any] | None = None,
    intra_op_threads: int = 0,
    warmup: bool = True,
    observer: BatchObserver | None = None,
    source: tuple[int, ...] | None = None,
    limits: RequestLimits = RequestLimits(),
    admission: AdmissionPolicy = AdmissionPolicy(),
    inference_nice: int = 0,
) -> ServedModel:
    """One repository entry loaded as the server loads it: ``overrides`` (the server's
    model.yaml overrides) applied, the first backend that loads, warmed up. Also the
    in-process path's loader (``visionserve segment --repository``). ``inference_nice``:
    a CPU model computes that many priority steps below the server's other threads."""
    config = dataclasses.replace(entry.config, **(overrides or {}))
    entry = dataclasses.replace(entry, config=config)
    backend = load_backend(entry, intra_op_threads, inference_nice)
    try:
        model = ServedModel(
            entry.name,
            entry.version,
            config,
            backend,
            observer=observer,
            source=source,
            limits=limits,
            admission=admission,
            inference_nice=inference_nice,
        )
    except BaseException:
        backend.close()
        raise
    caveat = tiling_caveat(config.input)
    if caveat is not None:
        log.warning("model %s: %s", entry.name, caveat)
    if warmup:
        try:
            model.warmup()
        except BaseException:
            model.close()
            raise
    return model


class ModelRegistry:
    """Loaded models by name and version; ``ready`` once the first load completed."""

    def __init__(
        self,
        *,
        intra_op_threads: int = 0,
        warmup: bool = True,
        overrides: Mapping[str, Any] | None = None,
        metrics: Metrics | None = None,
        on_change: Callable[[str, bool], None] | None = None,
        drain_timeout: float = 30.0,
        limits: RequestLimits = RequestLimits(),
        admission: AdmissionPolicy = AdmissionPolicy(),
        inference_nice: int = 0,
    ) -> None:
        self._models: dict[str, dict[int, ServedModel]] = {}
        self._failures: dict[str, LoadFailure] = {}
        self._lock = threading.Lock()  # lookups + swaps
        self._load_lock = threading.Lock()  # one sync at a time
        self._intra_op_threads = intra_op_threads
        self._warmup = warmup
        self._overrides = dict(overrides or {})
        self._metrics = metrics
        self._on_change = on_change
        self._drain_timeout = drain_timeout
        self._limits = limits
        self._admission = admission
        self._inference_nice = inference_nice
        self.ready = False

    # -- loading -------------------------------------------------------------------------
    def load_all(self, repository: ModelRepository, names: list[str] | None = None) -> None:
        """First load: every model (or ``names``), then ready. Errors name the model."""
        self.sync(repository, names)
        if not self._models:
            log.warning("model repository %s: no models loaded", repository.root)
        self.ready = True

    def sync(
        self, repository: ModelRepository, names: list[str] | None = None, *, strict: bool = False
    ) -> list[str]:
        """Load new/changed versions, swap them in, retire the old; returns changed names.

        ``names`` None: the whole repository (models gone from disk are unloaded). A model
        that fails to load is recorded (``failure``), not raised, unless ``strict``.
        """
        with self._load_lock:
            wanted = repository.model_names() if names is None else list(names)
            changed = [n for n in wanted if self._try_sync(repository, n, strict)]
            if names is None:
                for gone in sorted(set(self._failures) - set(wanted)):
                    del self._failures[gone]
                for gone in sorted(set(self._models) - set(wanted)):
                    self.unload(gone)
                    changed.append(gone)
            return changed

    def failure(self, name: str) -> LoadFailure | None:
        """Why ``name``'s files did not load (None: they did, or were not tried)."""
        return self._failures.get(name)

    def _try_sync(self, repository: ModelRepository, name: str, strict: bool) -> bool:
        files = repository.model_files(name)  # NotFound for an unknown name: raised
        failure = self._failures.get(name)
        if failure is not None and failure.files == files and not strict:
            return False  # these very files failed: tried again when they change
        try:
            changed = self._sync_model(repository, name)
        except Exception as exc:
            self._failed(name, exc, files)
            if strict:
                raise
            return False
        if self._failures.pop(name, None) is not None:
            log.info("model %s: its changed files load", name)
        return changed

    def _failed(self, name: str, exc: Exception, files: tuple[tuple[str, int, int], ...]) -> None:
        reason = f"{type(exc).__name__}: {exc}".strip()
        self._failures[name] = LoadFailure(reason, files)
        serving = bool(self._models.get(name))
        log.error(
            "model %s failed to load (%s); %s; tried again when its files change",
            name,
            reason,
            f"versions {self.versions(name)} keep serving" if serving else "NOT_SERVING",
        )
        log.debug("model %s: the load failure in full", name, exc_info=exc)
        if not serving:
            self._notify(name, False)

    def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get NOT_FOUND, requests in flight finish."""
        check_model_name(name)
        with self._lock:
            if name not in self._models:
                raise NotFound(f"model {name!r} is not loaded: loaded models are {self._listing()}")
            models = dict(self._models)
            old = models.pop(name)
            self._models = models
        self._notify(name, False)
        for model in old.values():
            model.retire(self._drain_timeout)
        log.info("unloaded %s (versions %s)", name, sorted(old))

    def _sync_model(self, repository: ModelRepository, name: str) -> bool:
        entries = [repository.entry(name, str(v)) for v in repository.versions(name)]
        current = self._models.get(name, {})
        table: dict[int, ServedModel] = {}
        loaded: list[ServedModel] = []
        try:
            for entry in entries:
                source = signature(entry)
                kept = current.get(entry.version)
                if kept is not None and kept.source == source:
                    table[entry.version] = kept
                else:
                    loaded.append(self._load(entry, source))
                    table[entry.version] = loaded[-1]
        except BaseException:
            for model in loaded:
                model.close()
            raise
        if not loaded and set(table) == set(current):
            return False
        with self._lock:
            models = dict(self._models)
            if table:
                models[name] = table
            else:
                models.pop(name, None)
            self._models = models
        self._notify(name, bool(table))
        log.info(
            "%s: serving versions %s (loaded %s)", name, sorted(table), [m.version for m in loaded]
        )
        for version, model in current.items():
            if table.get(version) is not model:
                model.retire(self._drain_timeout)
        return True

    def _load(self, entry: ModelEntry, source: tuple[int, ...]) -> ServedModel:
        observer = self._metrics.model(entry.name) if self._metrics is not None else None
        return load_model(
            entry,
            overrides=self._overrides,
            intra_op_threads=self._intra_op_threads,
            warmup=self._warmup,
            observer=observer,
            source=source,
            limits=self._limits,
            admission=self._admission,
            inference_nice=self._inference_nice,
        )

    def _notify(self, name: str, serving: bool) -> None:
        if self._on_change is not None:
            self._on_change(name, serving)

    # -- lookups -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def get(self, name: str, version: str = "") -> ServedModel:
        """The model ``name`` at ``version`` (empty: latest); NOT_FOUND lists what exists."""
        if not self.ready:
            raise Unavailable(
                "the server is still loading its models; retry when health is SERVING"
            )
        check_model_name(name)
        wanted = parse_version(version)
        versions = self._models.get(name)
        if not versions and name in self._failures:
            raise Unavailable(
                f"model {name!r} failed to load: {self._failures[name].reason} (fix its files "
                f"in the repository; a polling server tries again when they change)"
            )
        if not versions:
            raise NotFound(f"unknown model {name!r}: available models are {self._listing()}")
        if wanted is None:
            return versions[max(versions)]
        if wanted not in versions:
            raise NotFound(
                f"model {name!r} has no version {wanted}: available versions are "
                f"{', '.join(str(v) for v in sorted(versions))}"
            )
        return versions[wanted]

    def acquire(self, name: str, version: str = "") -> ServedModel:
        """``get`` + ``enter``: the caller must call ``model.exit()`` when done with it."""
        with self._lock:
            model = self.get(name, version)
            model.enter()
        return model

    @contextmanager
    def use(self, name: str, version: str = "") -> Iterator[ServedModel]:
        """Hold a model for one request: a swap or unload waits until it is released."""
        model = self.acquire(name, version)
        start, ok = time.monotonic(), False
        try:
            yield model
            ok = True
        finally:
            model.statistics.on_request(time.monotonic() - start, ok)
            model.exit()

    def refusal_unread(self, task: str | None) -> str | None:
        """The refusal for a call not yet read when every loaded model that could take it
        (of ``task``; None: any) is at its admission limit, counted by the first as shed
        and as a failed request (as a refusal after reading is); None while one has room (or none is loaded: the call is read and answered as
        usual). Whichever model the body names, it would be refused: the front end
        need not read 110 KB to 3 MB of image first."""
        with self._lock:
            models = [m for versions in self._models.values() for m in versions.values()]
        models = [m for m in models if task is None or m.task == task]
        if not self.ready or not models:
            return None
        messages = []
        for model in models:
            message = model.admission.full_message()
            if message is None:
                return None
            messages.append(message)
        models[0].admission.shed("capacity")
        models[0].statistics.on_request(0.0, False)
        return "; ".join(messages)

    def _listing(self) -> str:
        return ", ".join(self.names()) or "none"

    def close(self) -> None:
        """Drain and close every model."""
        with self._lock:
            models, self._models = self._models, {}
        for versions in models.values():
            for model in versions.values():
                model.retire(self._drain_timeout)
