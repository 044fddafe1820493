"""Repository entry -> TensorRT engine: ``model.plan`` + ``engine.json`` (+ validation).

``build_engine`` chains::

    repository entry -> ONNX of the precision (FP16: write + validate model.fp16.onnx)
      -> target (local GPU, or TensorRT-RTX ahead of time for a compute capability)
      -> engine_from_onnx_path (profile = model.yaml profile, timing cache)
      -> model.plan | model.fp16.plan + engine.json
      -> engine validation vs FP32 ONNX Runtime (GPU only; otherwise skipped, with why)
      -> "tensorrt" first in model.yaml backends (local-GPU engines that validated)

``engine.json`` describes the engine the server loads for that version (the last one
built); its schema and the load decision live in :mod:`visionserve.server.engine_compat`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from visionserve.export.agreement import (
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    agreement,
    merge_validation,
    passes,
    run_batched,
    validation_images,
)
from visionserve.export.fp16 import FP16_FILE, FP32_FILE, VALIDATION_FILE, fp16_variant, ort_runner
from visionserve.export.trt_builder import (
    BuildOptions,
    TensorRTResult,
    engine_from_onnx_path,
    load_tensorrt,
)
from visionserve.server.atomic import write_atomic
from visionserve.server.engine_compat import (
    AHEAD_OF_TIME,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    detect_gpu,
    sha256_file,
)
from visionserve.server.model_config import ModelConfig
from visionserve.server.repository import CONFIG_FILE, ModelEntry, ModelRepository

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": (FP32_FILE, "model.plan"), "fp16": (FP16_FILE, "model.fp16.plan")}
DEFAULT_AOT_CAPABILITY = "8.6"


class EngineBuildError(RuntimeError):
    """The engine could not be built (no TensorRT, bad target, parse or build failure)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the engine will run: compute capability, and whether that is this machine's GPU."""

    compute_capability: str
    local: bool
    gpu: str  # GPU name, or "ahead-of-time"


def choose_target(
    flavour: str, requested: str | None, gpu: tuple[str | None, str | None, str]
) -> Target:
    """The build target for ``flavour`` given ``--compute-capability`` and the local GPU."""
    name, capability, reason = gpu
    if flavour == "tensorrt":
        if capability is None:
            raise EngineBuildError(
                f"full TensorRT builds for the local GPU, and there is none ({reason}); "
                "use --flavour tensorrt_rtx --compute-capability X.Y to build ahead of time"
            )
        if requested and requested != capability:
            raise EngineBuildError(
                f"full TensorRT builds for the local GPU ({name}, {capability}), not {requested}; "
                "use --flavour tensorrt_rtx to build ahead of time for another GPU"
            )
        return Target(capability, True, name or "unknown GPU")
    chosen = requested or capability or DEFAULT_AOT_CAPABILITY
    if requested is None and capability is None:
        logger.info(
            "no local GPU (%s): building ahead of time for compute capability %s", reason, chosen
        )
    local = capability is not None and chosen == capability
    return Target(chosen, local, (name or "unknown GPU") if local else AHEAD_OF_TIME)


def _onnx_for(entry: ModelEntry, precision: str, samples: int, seed: int) -> Path:
    """The ONNX file to build from; for FP16, written and validated first when needed."""
    onnx_name, _ = PRECISIONS[precision]
    path = entry.directory / onnx_name
    if precision == "fp32":
        if not path.is_file():
            raise EngineBuildError(f"no ONNX model at {path}: export the model first")
        return path
    source = entry.directory / FP32_FILE
    stale = not path.is_file() or path.stat().st_mtime < source.stat().st_mtime
    validated = _read_json(entry.directory / VALIDATION_FILE).get("fp16_onnx", {}).get("passed")
    if stale or not validated:
        logger.info("%s v%d: writing and validating %s", entry.name, entry.version, FP16_FILE)
        fp16_variant(entry.directory, entry.config, samples=samples, seed=seed)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _failure(result: TensorRTResult, onnx_path: Path) -> str:
    lines = [f"{e.node_name} ({e.op_type}): {e.message}" for e in result.parse_errors]
    detail = "; ".join(lines) or result.error or "unknown error"
    stage = "parse" if not result.parsed else "build"
    return f"TensorRT ({result.library} {result.version}) could not {stage} {onnx_path}: {detail}"


def manifest_for(
    entry: ModelEntry,
    result: TensorRTResult,
    target: Target,
    precision: str,
    onnx_path: Path,
    plan_path: Path,
) -> dict[str, Any]:
    """The ``engine.json`` content of a built engine."""
    return {
        "format": MANIFEST_FORMAT,
        "model": entry.name,
        "version": entry.version,
        "plan": plan_path.name,
        "plan_bytes": plan_path.stat().st_size,
        "plan_sha256": sha256_file(plan_path),
        "flavour": result.library,
        "tensorrt_version": result.version,
        "target": "local GPU" if target.local else AHEAD_OF_TIME,
        "gpu": target.gpu,
        "compute_capability": target.compute_capability,
        "precision": precision,
        "onnx": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "profiles": {
            name: dict(zip(("min", "opt", "max"), shapes, strict=True))
            for name, shapes in result.profile.items()
        },
        "build_flags": {
            **result.build_flags,
            "precision_from": "onnx tensor types (strongly typed network)",
            "hardware_compatibility_level": "none",
            "version_compatible": False,
        },
        "build_seconds": result.build_seconds,
        "engine_bytes": result.engine_bytes,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def validate_engine(
    entry: ModelEntry,
    target: Target,
    precision: str,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Run the engine and the FP32 ONNX on the same samples (GPU only); the report.

    Returns ``{"skipped": reason}`` where the engine cannot run here (ahead-of-time build,
    no GPU): engines are never deserialized without a GPU.
    """
    if not target.local:
        reason = (
            f"engine built ahead of time for SM {target.compute_capability}, not for a GPU here"
        )
        logger.info("engine validation skipped: %s", reason)
        return {"skipped": reason}
    from visionserve.server.backends.tensorrt import TensorRTBackend

    config = entry.config
    images = validation_images(config, samples, seed)
    batch = max(1, min(16, config.profile.batch[2]))
    backend = TensorRTBackend(entry.directory, device=config.device)
    try:
        start = time.perf_counter()
        candidate = run_batched(backend.infer, config.input.name, images, batch)
        seconds = time.perf_counter() - start
    finally:
        backend.close()
    reference = run_batched(
        ort_runner(entry.directory / FP32_FILE), config.input.name, images, batch
    )
    result = agreement(config, reference, candidate)
    ok, threshold = passes(result)
    return {
        "passed": ok,
        "precision": precision,
        "reference": f"{FP32_FILE} on onnxruntime CPU",
        **result,
        "threshold": threshold,
        "engine_seconds": round(seconds, 3),
        "inputs": {"count": samples, "seed": seed, "shape": list(images.shape)},
    }


def _promote(entry: ModelEntry) -> None:
    """Put "tensorrt" first in the model's backends (model.yaml is shared by its versions)."""
    config: ModelConfig = entry.config
    backends = ("tensorrt", *[b for b in config.backends if b != "tensorrt"])
    if backends != config.backends:
        dataclasses.replace(config, backends=backends).save(entry.directory.parent / CONFIG_FILE)
        logger.info("%s: backends now %s", entry.name, list(backends))


def build_engine(
    repository: Path,
    model: str,
    *,
    version: int | None = None,
    precision: str = "fp32",
    compute_capability: str | None = None,
    flavour: str = "auto",
    options: BuildOptions | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Build the engine of ``model`` (latest version unless given); returns the manifest.

    The manifest carries ``"validation"`` (engine vs FP32 ONNX, or why skipped). Raises
    :class:`EngineBuildError` when nothing could be built, and
    :class:`~visionserve.export.fp16.Fp16ValidationError` when the FP16 ONNX fails.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    entry = ModelRepository(Path(repository)).entry(model, "" if version is None else str(version))
    onnx_path = _onnx_for(entry, precision, samples, seed)
    trt = load_tensorrt(flavour)
    if trt is None:
        raise EngineBuildError(
            f"no TensorRT library importable (asked for {flavour!r}): install NVIDIA TensorRT, or "
            "TensorRT-RTX (pip install 'visionserve[tensorrt-rtx]') to build ahead of time"
        )
    target = choose_target(trt.__name__, compute_capability, detect_gpu(entry.config.device))
    logger.info(
        "%s v%d: building %s engine from %s with %s %s for SM %s (%s)",
        entry.name,
        entry.version,
        precision,
        onnx_path.name,
        trt.__name__,
        trt.__version__,
        target.compute_capability,
        "local GPU" if target.local else AHEAD_OF_TIME,
    )
    result = engine_from_onnx_path(
        onnx_path,
        entry.config.profile,
        trt,
        keep_engine=True,
        compute_capability=target.compute_capability,
        options=options,
    )
    if not result.built or result.engine is None:
        raise EngineBuildError(_failure(result, onnx_path))
    plan_path = entry.directory / PRECISIONS[precision][1]
    write_atomic(plan_path, result.engine)
    manifest = manifest_for(entry, result, target, precision, onnx_path, plan_path)
    manifest_path = entry.directory / MANIFEST_FILE
    if manifest_path.is_file():
        logger.info("replacing %s (the server loads the engine it names)", manifest_path)
    write_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    logger.info(
        "wrote %s (%.1f MB, %.1f s) and %s",
        plan_path,
        manifest["plan_bytes"] / 1e6,
        result.build_seconds or 0.0,
        manifest_path.name,
    )
    validation = validate_engine(entry, target, precision, samples=samples, seed=seed)
    merge_validation(entry.directory / VALIDATION_FILE, f"tensorrt_{precision}", validation)
    if target.local and validation.get("passed"):
        _promote(entry)
    return {**manifest, "validation": validation}
