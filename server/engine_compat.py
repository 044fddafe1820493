"""``engine.json``: the manifest of a TensorRT engine, and whether this machine can load it.

``visionserve build`` writes ``REPO/<name>/<version>/engine.json`` beside the plan it
built; the server reads it *before* touching the plan. A TensorRT engine only runs under
the TensorRT version (and flavour) that built it, on a GPU of the compute capability it
was built for; deserializing anything else fails or crashes. :func:`check_engine` is the
pure decision (manifest + plan file + runtime facts -> :class:`EngineDecision`);
:func:`detect_runtime` gathers the runtime facts (importing TensorRT and cuda-python
lazily, so this module imports on any machine and never imports torch).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST_FILE = "engine.json"
MANIFEST_FORMAT = 1
AHEAD_OF_TIME = "ahead-of-time"
FLAVOURS = ("tensorrt", "tensorrt_rtx")
REQUIRED_KEYS = {
    "format": int,
    "plan": str,
    "plan_bytes": int,
    "plan_sha256": str,
    "flavour": str,
    "tensorrt_version": str,
    "compute_capability": str,
    "precision": str,
    "profiles": dict,
}


@dataclass(frozen=True)
class RuntimeInfo:
    """What the loading machine offers: TensorRT flavour + version, and its GPU (if any)."""

    flavour: str | None  # "tensorrt" | "tensorrt_rtx" | None: not importable
    version: str | None
    gpu_name: str | None = None  # None: no usable CUDA GPU
    compute_capability: str | None = None  # "9.0"
    reason: str = ""  # why something is missing


# TensorRT-RTX runs on these compute capabilities (major 12: every 12.x), not on 9.0 / 10.x
# (H100, H200, B200): TensorRT-RTX support matrix 1.0-1.5 (7.5, 8.6, 8.9, 12.0, 12.1) and
# "CPU-Only AOT" page (8.0, 8.6, 8.9, 12.0 and later).
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9")
RTX_COMPUTE_MAJORS = (12,)
# Version-compatible engines run on the same or a newer runtime of the same major, and across
# these majors only (TensorRT 11.4 support matrix, "Engine Portability": 8 -> 10, 10 -> 11;
# TensorRT 10 "Version Compatibility": 8 -> 9 and 10). Never on an older runtime.
VERSION_COMPATIBLE_MAJORS = {(8, 9), (8, 10), (10, 11)}


@dataclass(frozen=True)
class EngineDecision:
    """Whether to load the engine; ``reason`` says why not (or what was found).

    ``warnings``: loadable, but worth a WARNING (e.g. another GPU model of the same
    compute capability than the one it was built and tuned on)."""

    ok: bool
    reason: str
    manifest: dict[str, Any] | None = None
    plan_path: Path | None = None
    warnings: tuple[str, ...] = ()


def runs_on(flavour: str, compute_capability: str) -> bool:
    """Whether ``flavour``'s runtime supports a GPU of ``compute_capability`` ("X.Y")."""
    if flavour != "tensorrt_rtx":
        return True  # full TensorRT: every current data-centre and RTX GPU
    major = int(compute_capability.split(".")[0])
    return compute_capability in RTX_COMPUTE_CAPABILITIES or major in RTX_COMPUTE_MAJORS


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check ``engine.json``; ``ValueError`` says what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004
    problems = [
        f"{key!r} ({kind.__name__})"
        for key, kind in REQUIRED_KEYS.items()
        if not isinstance(data.get(key), kind)
    ]
    if problems:
        raise ValueError(f"{path}: missing or mistyped keys: {', '.join(problems)}")
    if data["format"] != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {data['format']} is not the supported {MANIFEST_FORMAT}")
    if data["flavour"] not in FLAVOURS:
        raise ValueError(f"{path}: flavour {data['flavour']!r} is not one of {FLAVOURS}")
    if Path(data["plan"]).name != data["plan"]:
        raise ValueError(f"{path}: plan {data['plan']!r} must be a file name in the same folder")
    return data


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _versions_match(manifest: dict[str, Any], running: str) -> bool:
    """Same version; or, for a version-compatible engine, a runtime at least as new of the
    same major (or of a major TensorRT names as compatible)."""
    built = manifest["tensorrt_version"]
    if not manifest.get("build_flags", {}).get("version_compatible"):
        return built == running
    old, new = _version_tuple(built), _version_tuple(running)
    if not old or not new or new < old:
        return False
    return old[0] == new[0] or (old[0], new[0]) in VERSION_COMPATIBLE_MAJORS


def _capability_matches(manifest: dict[str, Any], running: str) -> bool:
    built = manifest["compute_capability"]
    level = manifest.get("build_flags", {}).get("hardware_compatibility_level", "none")
    if str(level).lower() in ("ampere_plus", "ampere+"):
        return float(running) >= 8.0
    return built == running


def _profile_problem(manifest: dict[str, Any], needs: tuple[str, tuple[int, ...]]) -> str | None:
    """Why the engine's profile cannot take the largest input the server will send, if so."""
    name, shape = needs
    profile = manifest["profiles"].get(name)
    if not isinstance(profile, dict) or "max" not in profile:
        return f"engine.json has no optimisation profile for input {name!r}"
    high = tuple(int(d) for d in profile["max"])
    if len(high) != len(shape) or any(d > h for d, h in zip(shape, high, strict=True)):
        return (
            f"the server sends input {name!r} up to {list(shape)} (max_batch_size x largest "
            f"image), beyond the engine profile's max {list(high)}; lower max_batch_size in "
            "model.yaml or rebuild the engine with a larger profile"
        )
    return None


def _runtime_problem(manifest: dict[str, Any], runtime: RuntimeInfo) -> str | None:
    flavour = manifest["flavour"]
    if runtime.flavour is None:
        return f"no TensorRT runtime here ({runtime.reason or 'tensorrt not importable'})"
    if runtime.flavour != flavour:
        return f"engine built by {flavour}, but the runtime here is {runtime.flavour}"
    if not _versions_match(manifest, runtime.version or ""):
        return (
            f"engine built by {flavour} {manifest['tensorrt_version']}, but this machine runs "
            f"{runtime.version}; rebuild it here with `visionserve build`"
        )
    if runtime.compute_capability is None:
        return f"no CUDA GPU here ({runtime.reason or 'none found'})"
    if not _capability_matches(manifest, runtime.compute_capability):
        return (
            f"engine built for compute capability {manifest['compute_capability']} "
            f"({manifest.get('gpu', '?')}), but this GPU ({runtime.gpu_name}) is "
            f"{runtime.compute_capability}; rebuild it here with `visionserve build`"
        )
    return None


def check_engine(
    version_dir: Path,
    runtime: RuntimeInfo,
    *,
    verify_sha256: bool = True,
    needs: tuple[str, tuple[int, ...]] | None = None,
) -> EngineDecision:
    """May ``version_dir``'s engine be deserialized on a machine described by ``runtime``?

    Checks, in order: engine.json present and well-formed; the plan it names exists with
    the recorded size (and sha256); ``needs`` (input name, largest shape the server will
    send) lies within the engine's profile; flavour, version and compute capability match.
    Pure apart from reading the two files.
    """
    manifest_path = Path(version_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        return EngineDecision(
            False, f"no {MANIFEST_FILE} in {version_dir} (build one with `visionserve build`)"
        )
    try:
        manifest = read_manifest(manifest_path)
    except ValueError as exc:
        return EngineDecision(False, f"corrupt engine manifest: {exc}")
    plan = manifest_path.parent / manifest["plan"]
    if not plan.is_file():
        return EngineDecision(
            False, f"plan file {plan} named by {manifest_path} is missing", manifest
        )
    size = plan.stat().st_size
    if size != manifest["plan_bytes"]:
        return EngineDecision(
            False,
            f"plan file {plan} is {size} bytes, {manifest_path} says {manifest['plan_bytes']}: "
            "corrupt or replaced",
            manifest,
            plan,
        )
    if verify_sha256 and sha256_file(plan) != manifest["plan_sha256"]:
        return EngineDecision(
            False,
            f"plan file {plan} does not match the sha256 in {manifest_path}: corrupt or replaced",
            manifest,
            plan,
        )
    problem = (_profile_problem(manifest, needs) if needs else None) or _runtime_problem(
        manifest, runtime
    )
    if problem is not None:
        return EngineDecision(False, problem, manifest, plan)
    built_on = manifest.get("gpu")
    warnings: tuple[str, ...] = ()
    if built_on not in (None, AHEAD_OF_TIME, runtime.gpu_name):
        warnings = (
            f"engine tuned on {built_on}, running on {runtime.gpu_name} (same compute "
            f"capability {runtime.compute_capability}): it loads, but its kernels were timed on "
            "the other GPU; rebuild it here with `visionserve build` for the best speed",
        )
    return EngineDecision(
        True,
        f"{manifest['flavour']} {manifest['tensorrt_version']} engine for "
        f"SM {manifest['compute_capability']} ({manifest['precision']}) matches this machine",
        manifest,
        plan,
        warnings,
    )


# --- runtime facts (lazy imports; no GPU needed to ask) --------------------------------------
def detect_gpu(device: int = 0) -> tuple[str | None, str | None, str]:
    """(GPU name, compute capability "X.Y", reason) of CUDA device ``device`` via cuda-python.

    Never creates engines; on a machine without a driver the runtime just returns an error.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        return None, None, f"cuda-python is not installed ({exc})"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        return None, None, f"no CUDA device ({getattr(err, 'name', err)})"
    if device >= count:
        return None, None, f"CUDA device {device} asked for, {count} present"
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        return None, None, f"cudaGetDeviceProperties failed ({getattr(err, 'name', err)})"
    name = (
        props.name.decode(errors="replace").rstrip("\x00")
        if isinstance(props.name, bytes)
        else str(props.name)
    )
    return name, f"{props.major}.{props.minor}", ""


def detect_runtime(flavour: str, device: int = 0) -> RuntimeInfo:
    """The runtime facts for an engine of ``flavour`` ("tensorrt" or "tensorrt_rtx")."""
    if flavour not in FLAVOURS:
        return RuntimeInfo(None, None, reason=f"unknown TensorRT flavour {flavour!r}")
    try:
        module = importlib.import_module(flavour)
    except ImportError as exc:
        return RuntimeInfo(None, None, reason=f"{flavour} is not importable ({exc})")
    name, capability, reason = detect_gpu(device)
    return RuntimeInfo(flavour, str(module.__version__), name, capability, reason)


def gpu_runtime_unavailable(flavours: tuple[str, ...] = FLAVOURS) -> str | None:
    """None when one of ``flavours`` and a CUDA GPU are present, else why not.

    Used to gate GPU tests (``gpu`` / ``tensorrt`` marks) and to explain skipped engine runs.
    """
    reasons = []
    for flavour in flavours:
        info = detect_runtime(flavour)
        capability = info.compute_capability
        if info.flavour is not None and capability is not None:
            if runs_on(flavour, capability):
                return None
            reasons.append(
                f"{flavour} {info.version} does not run on compute capability {capability} "
                f"({info.gpu_name}); it runs on {', '.join(RTX_COMPUTE_CAPABILITIES)} and 12.x"
            )
            continue
        reasons.append(info.reason or f"{flavour}: no CUDA GPU")
    return "; ".join(reasons)
