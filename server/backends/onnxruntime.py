"""ONNX Runtime backend: one ``InferenceSession`` per model version.

``onnxruntime-cpu`` runs on ``CPUExecutionProvider``; ``onnxruntime-cuda`` on
``CUDAExecutionProvider`` of CUDA device ``device`` (the model's ``model.yaml``
``device``), with CPU fallback for unsupported nodes. It is refused, with the providers
that are available, when this onnxruntime build has no CUDA, and when the session came
up without ``CUDAExecutionProvider`` (ONNX Runtime falls back to CPU silently, e.g. for
a device index that does not exist, or when cuDNN/cuBLAS cannot be loaded). Before the
first CUDA session, ``onnxruntime.preload_dlls()`` (onnxruntime-gpu >= 1.21) loads CUDA
and cuDNN from the ``nvidia-*`` pip wheels: the server never imports torch, which would
otherwise have loaded them. :func:`provider_options` gives the providers and their options:
``prefer_nhwc=1`` (measured elsewhere on an H100: FP16 ResNet-50 at 10,600 instead of 8,700
images/s) and the model's ``cudnn_conv_algo_search`` (default HEURISTIC: EXHAUSTIVE
benchmarks every convolution again for every new input shape, a stall per shape).

IO binding (on by default for ``onnxruntime-cuda``, off for ``onnxruntime-cpu``;
``io_binding=True`` forces it, which the tests use on CPU). What it does, per thread:
the input is copied into a device buffer and the outputs are written by ONNX Runtime into
device buffers; while the input shape repeats (a busy server sends the same batch shape
again and again), the same buffers are bound again instead of being allocated, and each
output is copied to host memory once. Against plain ``run`` (which also copies each way
once) it saves the per-call device allocations, not a copy; its gain on a GPU has not been
measured here. ``InferenceSession.run`` and ``run_with_iobinding`` (one binding per
thread) are thread-safe, so ``infer`` may be called concurrently.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from visionserve.server.backends.base import TensorSpec

log = logging.getLogger(__name__)

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
_PRELOAD_LOCK = threading.Lock()
_preloaded: list[str] = []  # what preload_cuda_libraries did, once per process


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (missing provider or runtime)."""


def provider_options(
    name: str, device: int, cudnn_conv_algo_search: str = "HEURISTIC"
) -> list[tuple[str, dict[str, str]]]:
    """The execution providers of backend ``name`` with their options, in priority order.

    ``device`` is the CUDA device index (ignored by ``onnxruntime-cpu``).
    """
    if name == "onnxruntime-cuda":
        cuda = {
            "device_id": str(device),
            "prefer_nhwc": "1",
            "cudnn_conv_algo_search": cudnn_conv_algo_search,
            "do_copy_in_default_stream": "1",
        }
        return [("CUDAExecutionProvider", cuda), ("CPUExecutionProvider", {})]
    if name == "onnxruntime-cpu":
        return [("CPUExecutionProvider", {})]
    raise ValueError(
        f"unknown ONNX Runtime backend {name!r}: expected 'onnxruntime-cpu' or 'onnxruntime-cuda'"
    )


def preload_cuda_libraries() -> str:
    """Call ``onnxruntime.preload_dlls()`` once per process (where this onnxruntime has it);
    returns what happened. Its messages (printed by ONNX Runtime) are logged instead."""
    with _PRELOAD_LOCK:
        if not _preloaded:
            preload = getattr(ort, "preload_dlls", None)
            if preload is None:
                _preloaded.append(f"onnxruntime {ort.__version__} has no preload_dlls()")
            else:
                printed = io.StringIO()
                try:
                    with contextlib.redirect_stdout(printed):
                        preload()
                    outcome = "onnxruntime.preload_dlls() called"
                except Exception as exc:  # noqa: BLE001 - the session then says what is missing
                    outcome = f"onnxruntime.preload_dlls() failed: {type(exc).__name__}: {exc}"
                text = printed.getvalue().strip()
                _preloaded.append(outcome + (f" ({text})" if text else ""))
            log.info("%s", _preloaded[0])
        return _preloaded[0]


@dataclass
class _Bound:
    """One thread's IO binding and the device buffers it reuses while the shape repeats."""

    binding: ort.IOBinding
    shapes: dict[str, tuple[object, ...]]
    inputs: dict[str, ort.OrtValue]
    outputs: list[ort.OrtValue] | None = None


class OnnxRuntimeBackend:
    """A loaded ONNX model. ``name`` is "onnxruntime-cpu" or "onnxruntime-cuda".

    ``device``: CUDA device index (``onnxruntime-cuda``). ``io_binding``: None = on for
    ``onnxruntime-cuda``, off for ``onnxruntime-cpu``; True/False forces it.
    """

    def __init__(
        self,
        path: Path,
        name: str = "onnxruntime-cpu",
        intra_op_threads: int = 0,
        *,
        device: int = 0,
        io_binding: bool | None = None,
        cudnn_conv_algo_search: str = "HEURISTIC",
    ) -> None:
        opts = provider_options(name, device, cudnn_conv_algo_search)  # ValueError: unknown name
        if device < 0:
            raise ValueError(f"{name}: device must be >= 0 (a CUDA device index), got {device}")
        path = Path(path)
        if not path.is_file():
            hint = " (write it with `visionserve build --fp16-onnx-only`)" if ".fp16." in path.name else ""
            raise FileNotFoundError(f"{name}: no ONNX model at {path}{hint}")
        self.name = name
        self.path = path
        self._cuda = name == "onnxruntime-cuda"
        self._device_id = device
        self._io_binding = self._cuda if io_binding is None else bool(io_binding)
        self._local = threading.local()
        self._session = self._create_session(opts, intra_op_threads)
        self._inputs = [_spec(x) for x in self._session.get_inputs()]
        self._outputs = [_spec(x) for x in self._session.get_outputs()]
        log.info(
            "%s loaded %s (providers %s, device %s, IO binding %s)",
            name,
            path,
            self._session.get_providers(),
            self.device,
            "on" if self._io_binding else "off",
        )

    def _create_session(
        self, opts: list[tuple[str, dict[str, str]]], intra_op_threads: int
    ) -> ort.InferenceSession:
        wanted = opts[0][0]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(
                f"{self.name} needs {wanted}, but this onnxruntime build offers {available} "
                f"(install onnxruntime-gpu for CUDA)"
            )
        preloaded = preload_cuda_libraries() if self._cuda else ""
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep instead of spinning: in a server they would burn
        # the cores that gRPC, decoding and the batcher need between batches (measured
        # on 2 cores: 23.4 -> 20.5 server CPU-ms per 256x256 UNet image).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(self.path),
            sess_options=options,
            providers=[p for p, _ in opts],
            provider_options=[o for _, o in opts],
        )
        providers = session.get_providers()
        if self._cuda and "CUDAExecutionProvider" not in providers:
            raise BackendUnavailable(
                f"{self.name}: CUDA device {self._device_id} could not be used (session "
                f"providers: {providers}; {preloaded}; ONNX Runtime's log says why)"
            )
        return session

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def device(self) -> str:
        """Where the model runs: "cpu" or "cuda:N"."""
        return f"cuda:{self._device_id}" if self._cuda else "cpu"

    @property
    def device_id(self) -> int:
        """The CUDA device index the session was asked to use."""
        return self._device_id

    @property
    def precision(self) -> str:
        """"fp16" for a model.fp16.onnx, else "fp32"."""
        return "fp16" if ".fp16." in self.path.name else "fp32"

    @property
    def intra_op_threads(self) -> int:
        """The threads ONNX Runtime was given (0: its own default)."""
        return int(self._session.get_session_options().intra_op_num_threads)

    @property
    def io_binding(self) -> bool:
        """Whether ``infer`` runs through IO binding."""
        return self._io_binding

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model: input name -> array in, output name -> array out."""
        expected = {spec.name for spec in self._inputs}
        if set(feeds) != expected:
            raise ValueError(
                f"{self.name}: feeds {sorted(feeds)} do not match the model inputs {sorted(expected)}"
            )
        names = [spec.name for spec in self._outputs]
        if self._io_binding:
            results = self._run_bound(feeds)
        else:
            results = self._session.run(names, feeds)
        return dict(zip(names, results, strict=True))

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``infer`` through IO binding, reusing this thread's device buffers (see above)."""
        bound = self._bound(feeds)
        for name, array in feeds.items():
            bound.inputs[name].update_inplace(np.ascontiguousarray(array))
        self._session.run_with_iobinding(bound.binding)
        if bound.outputs is None:  # first run at this shape: keep what ONNX Runtime allocated
            bound.outputs = bound.binding.get_outputs()
            for spec, value in zip(self._outputs, bound.outputs, strict=True):
                bound.binding.bind_ortvalue_output(spec.name, value)
        return bound.binding.copy_outputs_to_cpu()  # new host arrays (the buffers stay bound)

    def _bound(self, feeds: dict[str, np.ndarray]) -> _Bound:
        """This thread's binding, re-made when an input's shape or dtype changed."""
        shapes = {name: (*array.shape, array.dtype.str) for name, array in feeds.items()}
        bound: _Bound | None = getattr(self._local, "bound", None)
        if bound is not None and bound.shapes == shapes:
            return bound
        kind, device_id = ("cuda", self._device_id) if self._cuda else ("cpu", 0)
        binding = self._session.io_binding()
        inputs = {}
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                array.shape, array.dtype, kind, device_id
            )
            binding.bind_ortvalue_input(name, value)
            inputs[name] = value
        for spec in self._outputs:
            binding.bind_output(spec.name, kind, device_id)
        bound = _Bound(binding, shapes, inputs)
        self._local.bound = bound
        return bound

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees it when unreferenced)."""
        self._session = None
        self._local = threading.local()


def _spec(node: ort.NodeArg) -> TensorSpec:
    dtype = np.dtype(_DTYPES.get(node.type, object))  # object: a type the server never feeds
    return TensorSpec(name=node.name, dtype=dtype, shape=tuple(node.shape))
