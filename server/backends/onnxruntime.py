"""ONNX Runtime backend: one ``InferenceSession`` per model version.

``onnxruntime-cpu`` runs on ``CPUExecutionProvider``; ``onnxruntime-cuda`` on
``CUDAExecutionProvider`` of CUDA device ``device`` (the model's ``model.yaml``
``device``), with CPU fallback for unsupported nodes. It is refused, with the providers
that are available, when this onnxruntime build has no CUDA, and when the session came
up without ``CUDAExecutionProvider`` (ONNX Runtime falls back to CPU silently, e.g. for
a device index that does not exist). :func:`provider_options` gives the providers and
their options (``prefer_nhwc=1``: measured on an H100, FP16 ResNet-50 ran at 10,600
instead of 8,700 images/s).

IO binding (on by default for ``onnxruntime-cuda``, off for ``onnxruntime-cpu``;
``io_binding=True`` forces it, which the tests use on CPU): each input is copied to the
device once as an ``OrtValue``, outputs are bound to host memory so ONNX Runtime copies
them back once at the end of the run, and the Python binding allocates nothing per call.
Without it, host-to-device copies were measured elsewhere to cost ~30% on an H100.
``InferenceSession.run`` and ``run_with_iobinding`` (with a binding per call) are
thread-safe, so ``infer`` may be called concurrently.
"""

from __future__ import annotations

import logging
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


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (missing provider or runtime)."""


def provider_options(name: str, device: int) -> list[tuple[str, dict[str, str]]]:
    """The execution providers of backend ``name`` with their options, in priority order.

    ``device`` is the CUDA device index (ignored by ``onnxruntime-cpu``).
    """
    if name == "onnxruntime-cuda":
        cuda = {
            "device_id": str(device),
            "prefer_nhwc": "1",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "do_copy_in_default_stream": "1",
        }
        return [("CUDAExecutionProvider", cuda), ("CPUExecutionProvider", {})]
    if name == "onnxruntime-cpu":
        return [("CPUExecutionProvider", {})]
    raise ValueError(
        f"unknown ONNX Runtime backend {name!r}: expected 'onnxruntime-cpu' or 'onnxruntime-cuda'"
    )


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
    ) -> None:
        opts = provider_options(name, device)  # ValueError for an unknown name
        if device < 0:
            raise ValueError(f"{name}: device must be >= 0 (a CUDA device index), got {device}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no ONNX model at {path}")
        wanted = opts[0][0]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(
                f"{name} needs {wanted}, but this onnxruntime build offers {available} "
                f"(install onnxruntime-gpu for CUDA)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep instead of spinning: in a server they would burn
        # the cores that gRPC, decoding and the batcher need between batches (measured
        # on 2 cores: 23.4 -> 20.5 server CPU-ms per 256x256 UNet image).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.name = name
        self.path = path
        self._device = device
        self._cuda = name == "onnxruntime-cuda"
        self._io_binding = self._cuda if io_binding is None else bool(io_binding)
        self._session = ort.InferenceSession(
            str(path),
            sess_options=options,
            providers=[p for p, _ in opts],
            provider_options=[o for _, o in opts],
        )
        providers = self._session.get_providers()
        if self._cuda and "CUDAExecutionProvider" not in providers:
            self._session = None
            raise BackendUnavailable(
                f"{name}: CUDA device {device} could not be used (session providers: {providers})"
            )
        self._inputs = [_spec(x) for x in self._session.get_inputs()]
        self._outputs = [_spec(x) for x in self._session.get_outputs()]
        log.info(
            "%s loaded %s (providers %s, device %d, IO binding %s)",
            name,
            path,
            providers,
            device,
            "on" if self._io_binding else "off",
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def device(self) -> int:
        """The CUDA device index the session was asked to use."""
        return self._device

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
            results = self._run_bound(feeds, names)
        else:
            results = self._session.run(names, feeds)
        return dict(zip(names, results, strict=True))

    def _run_bound(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """``infer`` through IO binding: inputs on the device, outputs back in host memory."""
        session = self._session
        device_type = "cuda" if self._cuda else "cpu"
        device_id = self._device if self._cuda else 0
        binding = session.io_binding()
        values = []  # kept alive until the run ends (CPU OrtValues share the numpy memory)
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array), device_type, device_id
            )
            values.append(value)
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees it when unreferenced)."""
        self._session = None


def _spec(node: ort.NodeArg) -> TensorSpec:
    dtype = np.dtype(_DTYPES.get(node.type, object))  # object: a type the server never feeds
    return TensorSpec(name=node.name, dtype=dtype, shape=tuple(node.shape))
