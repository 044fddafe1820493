"""TensorRT backend: one deserialized engine, one execution context, one CUDA stream.

Loaded from a repository version folder holding ``engine.json`` + the plan it names
(written by ``visionserve build``). Before anything is deserialized,
:func:`visionserve.server.engine_compat.check_engine` compares the manifest with the
running TensorRT and GPU, and the engine's profile with the largest input the server will
send (``max_input_shape``: max_batch_size rows of the largest image); a mismatch raises
:class:`EngineIncompatible`, so the server's backend loader falls back to the next backend
(the version's ONNX model), logging why at WARNING.

Device buffers (``cudaMalloc``) and pinned host buffers (``cudaMallocHost``) sized for the
profile's max shapes are allocated once and bound with ``set_tensor_address``; each
``infer`` sets the input shapes, copies in on the backend's non-blocking stream (it does
not synchronise with the legacy default stream), runs ``execute_async_v3`` and copies out.
**One execution context: a model's ``instances`` share it behind one lock**, so TensorRT
batches run one at a time on the GPU (its kernels already fill the GPU at server batch
sizes; contexts running concurrently would each need an optimisation profile of their
own, and ``visionserve build`` builds one). ``tensorrt`` / ``tensorrt_rtx`` and
``cuda.bindings`` are imported lazily, so this module imports on a machine without them.

Verified here: imports and the refusal path (CPU-only CI). The GPU path follows the
TensorRT 10 Python API (``IExecutionContext.set_input_shape``/``set_tensor_address``/
``execute_async_v3``) and cuda-python's runtime API; it runs only where a GPU is present.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionserve.server.backends.base import TensorSpec
from visionserve.server.engine_compat import (
    MANIFEST_FILE,
    RuntimeInfo,
    check_engine,
    detect_runtime,
    read_manifest,
)

log = logging.getLogger(__name__)


class EngineIncompatible(RuntimeError):
    """The engine cannot be loaded here (mismatch, missing or corrupt files)."""


def _check(result: tuple[Any, ...], what: str) -> Any:
    """Unpack a cuda-python call ``(err, *values)``; raise naming ``what`` on an error."""
    from cuda.bindings import runtime as cudart

    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)} ({text!r})")
    return values[0] if len(values) == 1 else tuple(values)


def _native_handle(stream: Any) -> int:
    """The address of a cuda-python stream, for TensorRT's ``execute_async_v3``.

    cuda-bindings 13 deprecates ``int(obj)`` for this in favour of
    ``cuda.bindings.utils.get_cuda_native_handle`` (13.0.0 release notes); older
    cuda-bindings have only ``int``."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    return int(get_cuda_native_handle(stream))


_LOGGERS: dict[str, Any] = {}


def _runtime_logger(trt: Any) -> Any:
    """One TensorRT logger per library, routed to ``logging`` (TensorRT keeps the first)."""
    if trt.__name__ not in _LOGGERS:

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    log.warning("TensorRT: %s", msg)

        _LOGGERS[trt.__name__] = _Logger()
    return _LOGGERS[trt.__name__]


@dataclass
class _Binding:
    """One I/O tensor: its buffers (max size) and a numpy view of the pinned host buffer."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # engine shape, -1 = dynamic
    min_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    nbytes: int
    device: int = 0
    host: int = 0
    host_view: np.ndarray | None = None


class TensorRTBackend:
    """A TensorRT engine from ``version_dir`` (``engine.json`` + plan). ``name`` = "tensorrt"."""

    name = "tensorrt"

    def __init__(
        self,
        version_dir: Path,
        *,
        device: int = 0,
        runtime: RuntimeInfo | None = None,
        input_name: str = "image",
        max_input_shape: tuple[int, ...] | None = None,
        instances: int = 1,
    ) -> None:
        version_dir = Path(version_dir)
        flavour = self._flavour(version_dir)
        runtime = runtime or detect_runtime(flavour, device)
        needs = (input_name, tuple(max_input_shape)) if max_input_shape else None
        decision = check_engine(version_dir, runtime, needs=needs)
        if not decision.ok:
            raise EngineIncompatible(
                f"TensorRT engine in {version_dir} not loaded: {decision.reason}"
            )
        log.info("%s: %s", version_dir, decision.reason)
        for warning in decision.warnings:
            log.warning("%s: %s", version_dir, warning)
        if instances > 1:
            log.warning(
                "%s: %d instances share one TensorRT execution context: batches run one at "
                "a time (set instances: 1 for a TensorRT model)",
                version_dir,
                instances,
            )
        self.path = decision.plan_path
        self.device = f"cuda:{device} ({runtime.gpu_name})"
        self.precision = str(decision.manifest["precision"]) if decision.manifest else "fp32"
        self._lock = threading.Lock()
        self._bindings: dict[str, _Binding] = {}
        self._stream: Any = None
        self._trt = importlib.import_module(flavour)
        from cuda.bindings import runtime as cudart

        self._cudart = cudart
        self._device = device
        _check(cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        try:
            self._load(self.path.read_bytes())
        except Exception:
            self.close()
            raise

    @staticmethod
    def _flavour(version_dir: Path) -> str:
        """The flavour engine.json names (it picks the runtime); refused if it has none."""
        try:
            return read_manifest(version_dir / MANIFEST_FILE)["flavour"]
        except ValueError:  # missing or corrupt: check_engine words the reason
            decision = check_engine(version_dir, RuntimeInfo(None, None))
            raise EngineIncompatible(
                f"TensorRT engine in {version_dir} not loaded: {decision.reason}"
            ) from None

    def _load(self, plan: bytes) -> None:
        trt = self._trt
        self._runtime = trt.Runtime(_runtime_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineIncompatible(f"{self.path}: TensorRT could not deserialize the engine")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"{self.path}: could not create an execution context (GPU memory?)")
        self._stream = _check(
            self._cudart.cudaStreamCreateWithFlags(self._cudart.cudaStreamNonBlocking),
            "cudaStreamCreateWithFlags(cudaStreamNonBlocking)",
        )
        self._describe_tensors()
        self._allocate()

    def _describe_tensors(self) -> None:
        engine, trt = self._engine, self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in inputs:  # max input shapes first: they fix the max output shapes
            lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
            self._context.set_input_shape(name, tuple(hi))
            self._add(name, True, tuple(lo), tuple(hi))
        for name in names:
            if name in inputs:
                continue
            hi = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in hi):
                raise EngineIncompatible(
                    f"{self.path}: output {name!r} has a data-dependent shape {hi}; "
                    "this backend needs output shapes that follow from the input shapes"
                )
            self._add(name, False, hi, hi)

    def _add(self, name: str, is_input: bool, lo: tuple[int, ...], hi: tuple[int, ...]) -> None:
        dtype = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))
        self._bindings[name] = _Binding(
            name=name,
            is_input=is_input,
            dtype=dtype,
            shape=tuple(self._engine.get_tensor_shape(name)),
            min_shape=lo,
            max_shape=hi,
            nbytes=int(np.prod(hi)) * dtype.itemsize,
        )

    def _allocate(self) -> None:
        cudart = self._cudart
        for b in self._bindings.values():
            size = max(b.nbytes, 1)
            b.device = int(_check(cudart.cudaMalloc(size), f"cudaMalloc({size}) for {b.name!r}"))
            b.host = int(
                _check(cudart.cudaMallocHost(size), f"cudaMallocHost({size}) for {b.name!r}")
            )
            raw = (ctypes.c_ubyte * size).from_address(b.host)
            b.host_view = np.frombuffer(raw, dtype=np.uint8)
            if not self._context.set_tensor_address(b.name, b.device):
                raise RuntimeError(f"{self.path}: set_tensor_address({b.name!r}) was refused")

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self._spec(b) for b in self._bindings.values() if b.is_input]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self._spec(b) for b in self._bindings.values() if not b.is_input]

    @staticmethod
    def _spec(b: _Binding) -> TensorSpec:
        return TensorSpec(
            name=b.name, dtype=b.dtype, shape=tuple(None if d < 0 else d for d in b.shape)
        )

    def _stage_input(self, b: _Binding, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=b.dtype)
        if array.ndim != len(b.shape) or any(
            not lo <= d <= hi
            for d, lo, hi in zip(array.shape, b.min_shape, b.max_shape, strict=True)
        ):
            raise ValueError(
                f"tensorrt: input {b.name!r} of shape {array.shape} is outside the engine's "
                f"profile {b.min_shape}..{b.max_shape}"
            )
        if not self._context.set_input_shape(b.name, array.shape):
            raise ValueError(f"tensorrt: set_input_shape({b.name!r}, {array.shape}) was refused")
        b.host_view[: array.nbytes] = array.reshape(-1).view(np.uint8)
        _check(
            self._cudart.cudaMemcpyAsync(
                b.device,
                b.host,
                array.nbytes,
                self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                self._stream,
            ),
            f"copy of {b.name!r} to the GPU",
        )

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine: input name -> array in, output name -> array out (copies)."""
        expected = {b.name for b in self._bindings.values() if b.is_input}
        if set(feeds) != expected:
            raise ValueError(
                f"tensorrt: feeds {sorted(feeds)} do not match the engine inputs {sorted(expected)}"
            )
        cudart = self._cudart
        with self._lock:
            _check(
                cudart.cudaSetDevice(self._device), f"cudaSetDevice({self._device})"
            )  # per thread
            for name, array in feeds.items():
                self._stage_input(self._bindings[name], array)
            if not self._context.execute_async_v3(_native_handle(self._stream)):
                raise RuntimeError(f"tensorrt: execute_async_v3 failed for {self.path}")
            shapes = {}
            for b in self._bindings.values():
                if b.is_input:
                    continue
                shape = tuple(self._context.get_tensor_shape(b.name))
                shapes[b.name] = shape
                nbytes = int(np.prod(shape)) * b.dtype.itemsize
                _check(
                    cudart.cudaMemcpyAsync(
                        b.host,
                        b.device,
                        nbytes,
                        cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                        self._stream,
                    ),
                    f"copy of {b.name!r} from the GPU",
                )
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return {
                name: self._read_output(self._bindings[name], shape)
                for name, shape in shapes.items()
            }

    @staticmethod
    def _read_output(b: _Binding, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * b.dtype.itemsize
        return b.host_view[:nbytes].view(b.dtype).reshape(shape).copy()

    def close(self) -> None:
        """Free the buffers and the stream, then the context and engine."""
        cudart = getattr(self, "_cudart", None)
        for b in getattr(self, "_bindings", {}).values():
            b.host_view = None
            if b.device and cudart is not None:
                cudart.cudaFree(b.device)
            if b.host and cudart is not None:
                cudart.cudaFreeHost(b.host)
            b.device = b.host = 0
        if getattr(self, "_stream", None) is not None and cudart is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = self._runtime = None
