"""ONNX file -> serialized TensorRT engine, with ``tensorrt`` or ``tensorrt_rtx``.

The one TensorRT builder of the project: :mod:`visionserve.export.audit` uses it to prove
that a graph builds, :mod:`visionserve.export.engine_build` to write ``model.plan``.

- Full TensorRT (10/11) builds for the local GPU.
- TensorRT-RTX builds ahead of time for a named compute capability (8.0/8.6/8.9/12.0...),
  also on a machine without a GPU.
- Networks are created strongly typed where the library has the flag (TensorRT 10; TensorRT
  11 and TensorRT-RTX are always strongly typed): the precision comes from the ONNX model
  (see :mod:`visionserve.export.fp16`), not from a builder flag.

Engines are never deserialized or run here (that needs a GPU; see
``visionserve.server.backends.tensorrt``).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from visionserve.server.atomic import write_atomic
from visionserve.server.model_config import ShapeProfile

logger = logging.getLogger(__name__)

__all__ = [
    "BuildOptions",
    "ParseIssue",
    "TensorRTResult",
    "engine_from_onnx_path",
    "load_tensorrt",
]

FLAVOURS = ("tensorrt", "tensorrt_rtx")


@dataclass(frozen=True)
class ParseIssue:
    """One error from TensorRT's ONNX parser."""

    node_index: int
    node_name: str
    op_type: str
    message: str


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings beyond the shape profile.

    ``workspace_mb``: limit of the builder's workspace pool (None: the library default).
    ``timing_cache``: a file read before and written after the build, so later builds
    reuse measured tactics (full TensorRT; TensorRT-RTX has no timing cache: recorded as
    not used). ``strongly_typed``: precision from the ONNX tensor types.
    """

    workspace_mb: int | None = None
    timing_cache: Path | None = None
    strongly_typed: bool = True

    def __post_init__(self) -> None:
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise ValueError(
                f"workspace_mb must be a positive number of MiB, got {self.workspace_mb}"
            )


@dataclass
class TensorRTResult:
    """What TensorRT made of the model: parse errors, and the engine build."""

    library: str  # "tensorrt" | "tensorrt_rtx"
    version: str
    target: str  # "SM86" (RTX ahead of time) or "local GPU"
    parsed: bool = False
    parse_errors: list[ParseIssue] = field(default_factory=list)
    built: bool = False
    build_seconds: float | None = None
    engine_bytes: int | None = None
    profile: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max]
    build_flags: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    engine: bytes | None = field(default=None, repr=False)  # kept only when asked

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("engine")
        return data


_LOGGERS: dict[str, Any] = {}


def load_tensorrt(which: str = "auto") -> ModuleType | None:
    """Import ``tensorrt`` or ``tensorrt_rtx``. ``which``: "auto" (tensorrt, then
    tensorrt_rtx), "tensorrt", "tensorrt_rtx" or "none". None when not importable."""
    if which not in ("auto", *FLAVOURS, "none"):
        raise ValueError(
            f"tensorrt must be 'auto', 'tensorrt', 'tensorrt_rtx' or 'none', got {which!r}"
        )
    names = {"auto": FLAVOURS, "none": ()}.get(which, (which,))
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            logger.debug("%s is not importable", name)
    return None


def trt_logger(trt: ModuleType) -> Any:
    """One logger per library (TensorRT keeps the first one it sees), routed to `logging`.

    Errors are also kept on ``.errors`` so a failed build can say what went wrong.
    """
    if trt.__name__ not in _LOGGERS:

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.errors.append(msg)
                    logger.debug("TensorRT: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    logger.debug("TensorRT warning: %s", msg)

        _LOGGERS[trt.__name__] = _Logger()
    return _LOGGERS[trt.__name__]


def compute_capability_enum(trt: ModuleType, value: str) -> Any:
    """``"8.6"`` / ``"SM86"`` -> ``trt.ComputeCapability.SM86`` (TensorRT-RTX only)."""
    key = "SM" + value.upper().removeprefix("SM").replace(".", "")
    try:
        return getattr(trt.ComputeCapability, key)
    except AttributeError:
        known = [k for k in trt.ComputeCapability.__members__ if k.startswith("SM")]
        raise ValueError(
            f"compute capability {value!r} is not one {trt.__name__} builds for; "
            f"choose from {known}"
        ) from None


def _dim_range(profile: ShapeProfile, axis: int, rank: int) -> tuple[int, int, int] | None:
    if axis == 0:
        return profile.batch
    if rank >= 3 and axis == rank - 2:
        return profile.height
    if rank >= 3 and axis == rank - 1:
        return profile.width
    return None


def _input_shapes(
    network: Any, profiles: Mapping[str, ShapeProfile] | ShapeProfile
) -> dict[str, list[list[int]]]:
    """min/opt/max shape of every network input: dynamic dims from the profile, static as is."""
    shapes: dict[str, list[list[int]]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        profile = profiles if isinstance(profiles, ShapeProfile) else profiles.get(tensor.name)
        if profile is None:
            raise ValueError(
                f"no ShapeProfile for input {tensor.name!r}; profiles given for {sorted(profiles)}"
            )
        per_dim = []
        for axis, size in enumerate(dims):
            if size >= 0:
                per_dim.append((size, size, size))
                continue
            rng = _dim_range(profile, axis, len(dims))
            if rng is None:
                raise ValueError(
                    f"input {tensor.name!r} {dims}: axis {axis} is dynamic but the profile has "
                    "no range for it "
                    "(batch covers axis 0, height/width the last two axes of a rank>=3 input)"
                )
            per_dim.append(rng)
        shapes[tensor.name] = [[d[k] for d in per_dim] for k in range(3)]
    return shapes


def _parse_errors(parser: Any) -> list[ParseIssue]:
    issues = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        issues.append(
            ParseIssue(
                node_index=int(err.node()),
                node_name=str(err.node_name()),
                op_type=str(err.node_operator()),
                message=str(err.desc()),
            )
        )
    return issues


def _network_flags(trt: ModuleType, options: BuildOptions) -> tuple[int, bool]:
    """create_network flags and whether the network is strongly typed."""
    if trt.__name__ == "tensorrt_rtx":
        return 0, True  # always strongly typed
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if options.strongly_typed and flag is not None:
        return 1 << int(flag), True
    return 0, False


RTX_TIMING_CACHE = (
    "not used: timing cache operations are no-ops in TensorRT-RTX (deprecated since 1.2); "
    "it compiles kernels just in time on the target GPU and caches them at run time instead"
)


def _attach_timing_cache(trt: ModuleType, config: Any, path: Path | None) -> dict[str, Any]:
    """Load ``path`` (if it exists) into the builder config; returns what was done."""
    if path is None:
        return {"path": None}
    if trt.__name__ == "tensorrt_rtx":
        return {"path": str(path), "used": False, "reason": RTX_TIMING_CACHE}
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        logger.warning(
            "timing cache %s does not match this builder/GPU; starting a fresh one", path
        )
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, True)
        data = b""
    return {"path": str(path), "used": True, "loaded_bytes": len(data)}


def _save_timing_cache(config: Any, path: Path, info: dict[str, Any]) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    data = bytes(cache.serialize())
    write_atomic(path, data)  # a concurrent build never reads half a cache
    info["saved_bytes"] = len(data)


def _configure(
    trt: ModuleType,
    builder: Any,
    network: Any,
    result: TensorRTResult,
    compute_capability: str,
    options: BuildOptions,
) -> Any:
    """The builder config: target, workspace, timing cache, one optimisation profile."""
    config = builder.create_builder_config()
    if trt.__name__ == "tensorrt_rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(compute_capability_enum(trt, compute_capability), 0)
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    result.build_flags["workspace_mb"] = options.workspace_mb
    result.build_flags["timing_cache"] = _attach_timing_cache(trt, config, options.timing_cache)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in result.profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    return config


def engine_from_onnx_path(
    path: str | Path,
    profile: Mapping[str, ShapeProfile] | ShapeProfile,
    trt: ModuleType,
    *,
    compute_capability: str = "8.6",
    keep_engine: bool = False,
    options: BuildOptions | None = None,
) -> TensorRTResult:
    """Parse ``path`` with TensorRT's OnnxParser and build a serialized engine.

    ``trt`` is the imported ``tensorrt`` or ``tensorrt_rtx`` module. With TensorRT-RTX the
    engine is built ahead of time for ``compute_capability``; full TensorRT builds for the
    local GPU. Never raises for a model that fails to parse or build: that is reported.
    """
    options = options or BuildOptions()
    rtx = trt.__name__ == "tensorrt_rtx"
    result = TensorRTResult(
        library=trt.__name__,
        version=trt.__version__,
        target=compute_capability_enum(trt, compute_capability).name if rtx else "local GPU",
    )
    trt_log = trt_logger(trt)
    trt_log.errors.clear()
    try:
        builder = trt.Builder(trt_log)
        flags, strongly_typed = _network_flags(trt, options)
        result.build_flags["strongly_typed"] = strongly_typed
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, trt_log)
        # Parse from the path, not bytes: external .onnx.data weights then load too.
        result.parsed = bool(parser.parse_from_file(str(path)))
        result.parse_errors = _parse_errors(parser)
        if not result.parsed:
            return result
        result.profile = _input_shapes(network, profile)
        config = _configure(trt, builder, network, result, compute_capability, options)
        start = time.perf_counter()
        engine = builder.build_serialized_network(network, config)
        result.build_seconds = round(time.perf_counter() - start, 3)
        if engine is not None and result.build_flags["timing_cache"].get("used"):
            _save_timing_cache(config, options.timing_cache, result.build_flags["timing_cache"])
    except (RuntimeError, TypeError, ValueError, OSError) as exc:  # TensorRT raises these
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if engine is None:
        messages = " | ".join(trt_log.errors[-5:]) or "no error logged"
        result.error = f"build_serialized_network returned no engine: {messages}"
        return result
    result.built = True
    result.engine_bytes = int(engine.nbytes)
    if keep_engine:
        result.engine = bytes(engine)
    return result
