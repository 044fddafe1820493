"""ONNX Runtime backend: one ``InferenceSession`` per model version.

``onnxruntime-cpu`` runs on ``CPUExecutionProvider``; ``onnxruntime-cuda`` on
``CUDAExecutionProvider`` (with CPU fallback for unsupported nodes) and is refused,
with the providers that are available, when this onnxruntime build has no CUDA.
``InferenceSession.run`` is thread-safe, so ``infer`` may be called concurrently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from visionserve.server.backends.base import TensorSpec

log = logging.getLogger(__name__)

PROVIDERS = {
    "onnxruntime-cpu": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (missing provider or runtime)."""


class OnnxRuntimeBackend:
    """A loaded ONNX model. ``name`` is "onnxruntime-cpu" or "onnxruntime-cuda"."""

    def __init__(
        self, path: Path, name: str = "onnxruntime-cpu", intra_op_threads: int = 0
    ) -> None:
        if name not in PROVIDERS:
            raise ValueError(
                f"unknown ONNX Runtime backend {name!r}: expected one of {sorted(PROVIDERS)}"
            )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no ONNX model at {path}")
        wanted = PROVIDERS[name][0]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(
                f"{name} needs {wanted}, but this onnxruntime build offers {available} "
                f"(install onnxruntime-gpu for CUDA)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.name = name
        self.path = path
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=PROVIDERS[name]
        )
        self._inputs = [_spec(x) for x in self._session.get_inputs()]
        self._outputs = [_spec(x) for x in self._session.get_outputs()]
        log.info("%s loaded %s (providers %s)", name, path, self._session.get_providers())

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model: input name -> array in, output name -> array out."""
        expected = {spec.name for spec in self._inputs}
        if set(feeds) != expected:
            raise ValueError(
                f"{self.name}: feeds {sorted(feeds)} do not match the model inputs {sorted(expected)}"
            )
        names = [spec.name for spec in self._outputs]
        results = self._session.run(names, feeds)
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees it when unreferenced)."""
        self._session = None


def _spec(node: ort.NodeArg) -> TensorSpec:
    dtype = np.dtype(_DTYPES.get(node.type, object))  # object: a type the server never feeds
    return TensorSpec(name=node.name, dtype=dtype, shape=tuple(node.shape))
