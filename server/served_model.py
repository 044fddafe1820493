"""A loaded model version: config + backend, with batch ``classify`` / ``segment``.

The servicer only talks to ``ServedModel``; a dynamic batcher can later sit inside it
(collecting single requests into the batches these methods already take) without
touching the servicer. ``ModelRegistry`` holds every loaded version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from visionserve.server.backends.base import Backend
from visionserve.server.errors import BackendError, InvalidArgument, NotFound, Unavailable
from visionserve.server.model_config import ModelConfig
from visionserve.server.postprocess import resize_mask
from visionserve.server.preprocess import preprocess_batch
from visionserve.server.repository import (
    ModelEntry,
    ModelRepository,
    check_model_name,
    parse_version,
)

log = logging.getLogger(__name__)


def _onnxruntime(name: str) -> Callable[[ModelEntry, int], Backend]:
    def factory(entry: ModelEntry, intra_op_threads: int) -> Backend:
        from visionserve.server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(entry.onnx_path, name=name, intra_op_threads=intra_op_threads)

    return factory


def _tensorrt(entry: ModelEntry, intra_op_threads: int) -> Backend:
    try:
        from visionserve.server.backends.tensorrt import TensorRTBackend  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError(f"the TensorRT backend is not available here ({exc})") from exc
    return TensorRTBackend(entry.directory)


# backend name (model.yaml `backends`) -> factory(entry, intra_op_threads)
BACKEND_FACTORIES: dict[str, Callable[[ModelEntry, int], Backend]] = {
    "tensorrt": _tensorrt,
    "onnxruntime-cuda": _onnxruntime("onnxruntime-cuda"),
    "onnxruntime-cpu": _onnxruntime("onnxruntime-cpu"),
}


def load_backend(entry: ModelEntry, intra_op_threads: int = 0) -> Backend:
    """Try the model's ``backends`` in order; the first that loads wins (logged)."""
    failures = []
    for name in entry.config.backends:
        try:
            backend = BACKEND_FACTORIES[name](entry, intra_op_threads)
        except Exception as exc:  # noqa: BLE001 - each failure is reported below
            log.info("%s v%d: backend %s not used: %s", entry.name, entry.version, name, exc)
            failures.append(f"{name}: {exc}")
            continue
        log.info("%s v%d: using backend %s", entry.name, entry.version, name)
        return backend
    raise RuntimeError(
        f"{entry.name} v{entry.version}: no backend could load it: " + "; ".join(failures)
    )


class ServedModel:
    """One model version ready to run batches of decoded RGB images."""

    def __init__(self, name: str, version: int, config: ModelConfig, backend: Backend) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.backend = backend
        inputs = {spec.name for spec in backend.inputs}
        outputs = {spec.name for spec in backend.outputs}
        if config.input.name not in inputs:
            raise ValueError(
                f"{name} v{version}: model.yaml input {config.input.name!r} is not a model input {sorted(inputs)}"
            )
        missing = sorted(set(config.outputs.values()) - outputs)
        if missing:
            raise ValueError(
                f"{name} v{version}: model.yaml outputs {missing} are not model outputs {sorted(outputs)}"
            )

    @property
    def task(self) -> str:
        return self.config.task

    def require_task(self, task: str, rpc: str) -> None:
        """``InvalidArgument`` when this model does another task than ``rpc`` needs."""
        if self.task != task:
            raise InvalidArgument(
                f"{rpc} needs a {task} model, but {self.name!r} is a {self.task} model"
            )

    def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB images -> class probabilities, float32 [N, num_classes]."""
        self.require_task("classification", "classify")
        rows = [
            self._run(chunk, self.config.outputs["probabilities"]) for chunk in self._chunks(images)
        ]
        probabilities = np.concatenate(rows, axis=0)
        expected = (len(images), self.config.num_classes)
        if probabilities.shape != expected:
            raise BackendError(
                f"{self.name}: model returned probabilities {probabilities.shape}, expected {expected}"
            )
        return probabilities.astype(np.float32, copy=False)

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB images -> uint8 class masks, each at its image's original height x width."""
        self.require_task("segmentation", "segment")
        spec = self.config.input
        masks: list[np.ndarray] = []
        for chunk in self._chunks(images):
            out = self._run(chunk, self.config.outputs["mask"])
            if out.ndim == 4 and out.shape[1] == 1:
                out = out[:, 0]
            if out.shape != (len(chunk), spec.height, spec.width):
                raise BackendError(
                    f"{self.name}: model returned a mask of shape {out.shape}, "
                    f"expected {(len(chunk), spec.height, spec.width)}"
                )
            if out.size and (out.min() < 0 or out.max() >= self.config.num_classes):
                raise BackendError(
                    f"{self.name}: model returned class values {int(out.min())}..{int(out.max())}, "
                    f"expected 0..{self.config.num_classes - 1}"
                )
            out = out.astype(np.uint8, copy=False)
            masks += [
                resize_mask(m, img.shape[0], img.shape[1])
                for m, img in zip(out, chunk, strict=True)
            ]
        return masks

    def warmup(self) -> None:
        """One inference on a mid-gray image, so the first request is not the slow one."""
        image = np.full((self.config.input.height, self.config.input.width, 3), 128, dtype=np.uint8)
        if self.task == "classification":
            self.classify([image])
        else:
            self.segment([image])

    def close(self) -> None:
        self.backend.close()

    def _chunks(self, images: list[np.ndarray]) -> list[list[np.ndarray]]:
        size = self.config.max_batch_size
        return [images[i : i + size] for i in range(0, len(images), size)]

    def _run(self, images: list[np.ndarray], output: str) -> np.ndarray:
        batch = preprocess_batch(images, self.config.input)
        try:
            return self.backend.infer({self.config.input.name: batch})[output]
        except Exception as exc:
            raise BackendError(
                f"{self.name} v{self.version}: inference failed: {type(exc).__name__}: {exc}"
            ) from exc


class ModelRegistry:
    """Every loaded version of every model, looked up by request (name, version)."""

    def __init__(self) -> None:
        self._models: dict[str, dict[int, ServedModel]] = {}
        self.ready = False

    def load_all(
        self, repository: ModelRepository, intra_op_threads: int = 0, warmup: bool = True
    ) -> None:
        """Load (and warm up) every version in ``repository``, then mark the registry ready.

        Errors name the model; nothing is served unless every model loaded.
        """
        models: dict[str, dict[int, ServedModel]] = {}
        for entry in repository.entries():
            backend = load_backend(entry, intra_op_threads)
            model = ServedModel(entry.name, entry.version, entry.config, backend)
            if warmup:
                model.warmup()
            models.setdefault(entry.name, {})[entry.version] = model
        if not models:
            log.warning("model repository %s holds no models", repository.root)
        self._models = models
        self.ready = True

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
        if not versions:
            raise NotFound(
                f"unknown model {name!r}: available models are {', '.join(self.names()) or 'none'}"
            )
        if wanted is None:
            return versions[max(versions)]
        if wanted not in versions:
            raise NotFound(
                f"model {name!r} has no version {wanted}: available versions are "
                f"{', '.join(str(v) for v in sorted(versions))}"
            )
        return versions[wanted]

    def close(self) -> None:
        for versions in self._models.values():
            for model in versions.values():
                model.close()
