"""A loaded model version: config + backend + dynamic batcher.

``ServedModel.classify`` / ``segment`` take decoded images, ``infer`` takes the model's
input tensor (the KServe path); all of them go through the model's ``Batcher``, so
concurrent single requests become batches. ``enter``/``exit`` count requests in flight
so that ``retire`` (unload, or a version swapped out) lets them finish first.
``registry.ModelRegistry`` holds every loaded version.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from visionserve.server.backends.base import Backend
from visionserve.server.batcher import Batcher, BatchObserver
from visionserve.server.errors import BackendError, DeadlineExceeded, InvalidArgument
from visionserve.server.model_config import ModelConfig
from visionserve.server.postprocess import mask_to_image
from visionserve.server.preprocess import layout, preprocess
from visionserve.server.repository import ModelEntry

log = logging.getLogger(__name__)


def _onnxruntime(name: str) -> Callable[[ModelEntry, int], Backend]:
    def factory(entry: ModelEntry, intra_op_threads: int) -> Backend:
        from visionserve.server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            entry.onnx_path,
            name=name,
            intra_op_threads=intra_op_threads or auto_threads(entry.config.instances),
            device=entry.config.device,
        )

    return factory


def auto_threads(instances: int) -> int:
    """ONNX Runtime threads per instance when none are set: the usable cores shared out.

    ONNX Runtime's own default (every core per session) oversubscribes as soon as a
    model has several instances: measured on 2 cores, the demo UNet at 256x256 ran at
    126 images/s with 2 instances x 1 thread, 113 with 1 instance x 2 threads.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, instances))


def _tensorrt(entry: ModelEntry, intra_op_threads: int) -> Backend:
    try:
        from visionserve.server.backends.tensorrt import TensorRTBackend  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError(f"the TensorRT backend is not available here ({exc})") from exc
    return TensorRTBackend(entry.directory, device=entry.config.device)


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
    """One model version ready to run requests, batched by its own ``Batcher``."""

    def __init__(
        self,
        name: str,
        version: int,
        config: ModelConfig,
        backend: Backend,
        *,
        observer: BatchObserver | None = None,
        source: object = None,
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.backend = backend
        self.source = source  # what it was loaded from (the repository's change signature)
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
        self._batcher = Batcher(
            f"{name} v{version}",
            self._infer_batch,
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
            queue_size=config.max_queue_size,
            instances=config.instances,
            observer=observer,
        )
        self._in_flight = 0
        self._idle = threading.Condition()

    @property
    def task(self) -> str:
        return self.config.task

    def require_task(self, task: str, rpc: str) -> None:
        """``InvalidArgument`` when this model does another task than ``rpc`` needs."""
        if self.task != task:
            raise InvalidArgument(
                f"{rpc} needs a {task} model, but {self.name!r} is a {self.task} model"
            )

    # -- requests ----------------------------------------------------------------------
    def submit(
        self, tensor: np.ndarray, deadline: float | None = None, *, inline: bool = False
    ) -> Future:
        """Queue an input tensor ``[rows, C, H, W]``; the future gives every output.

        ``inline=True``: the caller waits for it at once, so it may run in the caller's
        thread when the model is idle (``Batcher.submit``).
        """
        return self._batcher.submit(tensor, deadline, inline=inline)

    def infer(self, tensor: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Run an input tensor through the batcher and wait for its outputs."""
        return wait_for(self.submit(tensor, deadline, inline=True), deadline)

    def classify(self, images: list[np.ndarray], deadline: float | None = None) -> np.ndarray:
        """RGB images -> class probabilities, float32 [N, num_classes]."""
        self.require_task("classification", "classify")
        name = self.config.outputs["probabilities"]
        inline = len(images) == 1
        futures = [self.submit(self.prepare(image), deadline, inline=inline) for image in images]
        probabilities = np.concatenate([wait_for(f, deadline)[name] for f in futures], axis=0)
        expected = (len(images), self.config.num_classes)
        if probabilities.shape != expected:
            raise BackendError(
                f"{self.name}: model returned probabilities {probabilities.shape}, expected {expected}"
            )
        return probabilities.astype(np.float32, copy=False)

    def segment(self, images: list[np.ndarray], deadline: float | None = None) -> list[np.ndarray]:
        """RGB images -> uint8 class masks, each at its image's original height x width."""
        self.require_task("segmentation", "segment")
        inline = len(images) == 1
        futures = [self.submit(self.prepare(image), deadline, inline=inline) for image in images]
        return [
            self.finish_mask(wait_for(f, deadline), image)
            for f, image in zip(futures, images, strict=True)
        ]

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """A decoded RGB image -> the model's input tensor with one row."""
        return preprocess(image, self.config.input)[None]

    def finish_mask(self, outputs: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray:
        """One request's outputs -> its uint8 mask at ``image``'s size (checked).

        The mask is cropped to where ``prepare`` put the image (pad mode) and resized
        back to the image's height x width.
        """
        plan = layout(image.shape[0], image.shape[1], self.config.input)
        out = outputs[self.config.outputs["mask"]]
        if out.ndim == 4 and out.shape[1] == 1:
            out = out[:, 0]
        if out.shape != (1, *plan.tensor):
            raise BackendError(
                f"{self.name}: model returned a mask of shape {out.shape}, "
                f"expected {(1, *plan.tensor)}"
            )
        if out.size and (out.min() < 0 or out.max() >= self.config.num_classes):
            raise BackendError(
                f"{self.name}: model returned class values {int(out.min())}..{int(out.max())}, "
                f"expected 0..{self.config.num_classes - 1}"
            )
        mask = out[0].astype(np.uint8, copy=False)
        return mask_to_image(mask, plan.content, image.shape[0], image.shape[1])

    # -- lifecycle -----------------------------------------------------------------------
    def warmup(self) -> None:
        """Run batch 1 at each square shape bucket in pad mode, the largest first, then
        batch 1 and ``max_batch_size`` at the model's input size, then one request end
        to end.

        Largest first: ONNX Runtime's CPU memory arena, grown from small shapes up, left
        the demo UNet at 512x512 6 % slower for the rest of the process (75 vs 70 ms
        per image, one thread); sized by the largest shape first, it is not."""
        spec = self.config.input
        for side in sorted(spec.buckets, reverse=True) if spec.mode == "pad" else ():
            self._infer_batch(self.prepare(np.full((side, side, 3), 128, np.uint8)))
        image = np.full((spec.height, spec.width, 3), 128, np.uint8)
        tensor = self.prepare(image)
        for rows in sorted({1, self.config.max_batch_size}):
            self._infer_batch(np.repeat(tensor, rows, axis=0))
        if self.task == "classification":
            self.classify([image])
        else:
            self.segment([image])

    def enter(self) -> None:
        """A request starts using this model (the registry calls it under its lock)."""
        with self._idle:
            self._in_flight += 1

    def exit(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def retire(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout``) for requests in flight to finish, then close.

        Returns False when requests were still in flight at the timeout.
        """
        with self._idle:
            drained = self._idle.wait_for(lambda: self._in_flight == 0, timeout)
        if not drained:
            log.warning("%s v%d: closing with requests still in flight", self.name, self.version)
        self.close()
        return drained

    def close(self) -> None:
        """Run what is queued, stop the batcher's workers, release the backend."""
        self._batcher.close()
        self.backend.close()

    def _infer_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return self.backend.infer({self.config.input.name: batch})
        except Exception as exc:
            raise BackendError(
                f"{self.name} v{self.version}: inference failed: {type(exc).__name__}: {exc}"
            ) from exc


def wait_for(future: Future, deadline: float | None) -> dict[str, np.ndarray]:
    """The future's result; ``DeadlineExceeded`` (and the request cancelled) at ``deadline``."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return future.result(timeout)
    except FutureTimeout:
        future.cancel()
        raise DeadlineExceeded(
            "the request's deadline passed while it waited for inference"
        ) from None
