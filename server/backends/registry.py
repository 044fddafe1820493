"""The backend registry: model.yaml backend names -> factories, and the loader that tries them.

``FACTORIES`` is the one list of backend names (``BACKEND_NAMES`` and model.yaml's check
derive from it). :func:`load_backend` tries a model's ``backends`` in order; the first that
loads wins. A GPU backend that cannot load is logged at WARNING with its reason, so a
CPU fallback never passes unnoticed; the backend that loaded is logged with its device.
Backends are imported lazily: this module imports without onnxruntime, TensorRT or CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from visionserve.server.cores import call_at_lower_priority, usable_cores

if TYPE_CHECKING:
    from visionserve.server.backends.base import Backend
    from visionserve.server.repository import ModelEntry

log = logging.getLogger(__name__)

Factory = Callable[["ModelEntry", int], "Backend"]


def auto_threads(instances: int) -> int:
    """ONNX Runtime threads per instance when none are set: the usable cores shared out.

    ONNX Runtime's own default (every core per session) oversubscribes as soon as a
    model has several instances: measured on 2 cores, the demo UNet at 256x256 ran at
    126 images/s with 2 instances x 1 thread, 113 with 1 instance x 2 threads.
    """
    return max(1, usable_cores() // max(1, instances))


def _onnxruntime(name: str) -> Factory:
    def factory(entry: ModelEntry, intra_op_threads: int) -> Backend:
        from visionserve.server.backends.onnxruntime import OnnxRuntimeBackend

        config = entry.config
        return OnnxRuntimeBackend(
            entry.onnx_path,
            name=name,
            intra_op_threads=intra_op_threads or auto_threads(config.instances),
            device=config.device,
            cudnn_conv_algo_search=config.cudnn_conv_algo_search,
        )

    return factory


def _tensorrt(entry: ModelEntry, intra_op_threads: int) -> Backend:
    from visionserve.server.backends.tensorrt import TensorRTBackend

    config = entry.config
    return TensorRTBackend(
        entry.directory,
        device=config.device,
        input_name=config.input.name,
        max_input_shape=config.max_input_shape(),
        instances=config.instances,
    )


# backend name (model.yaml `backends`) -> factory(entry, intra_op_threads); the one list
FACTORIES: dict[str, Factory] = {
    "tensorrt": _tensorrt,
    "onnxruntime-cuda": _onnxruntime("onnxruntime-cuda"),
    "onnxruntime-cpu": _onnxruntime("onnxruntime-cpu"),
}
BACKEND_NAMES: tuple[str, ...] = tuple(FACTORIES)
GPU_BACKENDS: frozenset[str] = frozenset({"tensorrt", "onnxruntime-cuda"})


def load_backend(entry: ModelEntry, intra_op_threads: int = 0, nice: int = 0) -> Backend:
    """Try the model's ``backends`` in order; the first that loads wins (logged with its
    device). A GPU backend that fails is logged at WARNING, the others at INFO.

    ``nice``: a CPU backend is created in a thread whose priority is that many steps
    lower, so the threads it creates to compute (ONNX Runtime's pool) run below the
    server's front end (``cores.call_at_lower_priority``)."""
    failures: list[str] = []
    tried: list[str] = []
    for name in entry.config.backends:
        try:
            steps = 0 if name in GPU_BACKENDS else nice
            backend = call_at_lower_priority(steps, FACTORIES[name], entry, intra_op_threads)
        except Exception as exc:  # noqa: BLE001 - each failure is reported below
            level = logging.WARNING if name in GPU_BACKENDS else logging.INFO
            log.log(level, "%s v%d: backend %s not used: %s", entry.name, entry.version, name, exc)
            failures.append(f"{name}: {exc}")
            tried.append(name)
            continue
        lost_gpu = name not in GPU_BACKENDS and any(t in GPU_BACKENDS for t in tried)
        log.log(
            logging.WARNING if lost_gpu else logging.INFO,
            "%s v%d: serving on %s%s",
            entry.name,
            entry.version,
            describe(backend),
            f" (fell back from {', '.join(tried)})" if tried else "",
        )
        return backend
    raise RuntimeError(
        f"{entry.name} v{entry.version}: no backend could load it: " + "; ".join(failures)
    )


def describe(backend: Backend) -> str:
    """"onnxruntime-cuda on cuda:0, fp16": what a log line or a bench prints of a backend."""
    return f"{backend.name} on {backend.device}, {backend.precision}"
