"""Server settings: one frozen object, checked at construction.

Environment variables (``VISIONSERVE_*``) are read in exactly one place,
:func:`load_settings`; explicit values (the CLI's options) win over them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionserve.server.admission import AdmissionPolicy
from visionserve.server.model_config import check_backends

if TYPE_CHECKING:  # requests imports cv2; settings must not (see decoder_guard)
    from visionserve.server.requests import RequestLimits

MIB = 1024 * 1024

# setting name -> environment variable
ENV_VARS = {
    "repository": "VISIONSERVE_REPOSITORY",
    "host": "VISIONSERVE_HOST",
    "port": "VISIONSERVE_PORT",
    "workers": "VISIONSERVE_WORKERS",
    "max_message_bytes": "VISIONSERVE_MAX_MESSAGE_BYTES",
    "max_decoded_pixels": "VISIONSERVE_MAX_DECODED_PIXELS",
    "default_top_k": "VISIONSERVE_DEFAULT_TOP_K",
    "grace_period_s": "VISIONSERVE_GRACE_PERIOD_S",
    "intra_op_threads": "VISIONSERVE_INTRA_OP_THREADS",
    "max_concurrent_rpcs": "VISIONSERVE_MAX_CONCURRENT_RPCS",
    "max_streams": "VISIONSERVE_MAX_STREAMS",
    "admission_wait_ms": "VISIONSERVE_ADMISSION_WAIT_MS",
    "max_admitted": "VISIONSERVE_MAX_ADMITTED",
    "max_batch_size": "VISIONSERVE_MAX_BATCH_SIZE",
    "max_queue_delay_ms": "VISIONSERVE_MAX_QUEUE_DELAY_MS",
    "instances": "VISIONSERVE_INSTANCES",
    "max_queue_size": "VISIONSERVE_MAX_QUEUE_SIZE",
    "metrics_port": "VISIONSERVE_METRICS_PORT",
    "model_control": "VISIONSERVE_MODEL_CONTROL",
    "poll_interval_s": "VISIONSERVE_POLL_INTERVAL_S",
    "tls_cert": "VISIONSERVE_TLS_CERT",
    "tls_key": "VISIONSERVE_TLS_KEY",
    "tls_client_ca": "VISIONSERVE_TLS_CLIENT_CA",
    "auth_token": "VISIONSERVE_AUTH_TOKEN",
    "backends": "VISIONSERVE_BACKENDS",
}
# setting name -> what a platform sets when ours is unset: Knative (KServe Serverless)
# sets PORT to the container port; KServe's storage initializer rewrites the runtime
# container's STORAGE_URI to /mnt/models, where it put the InferenceService's storageUri.
PLATFORM_ENV_VARS = {"port": "PORT", "repository": "STORAGE_URI"}

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
# Settings that override every model's model.yaml batching fields when set.
BATCHING_OVERRIDES = (
    "max_batch_size",
    "max_queue_delay_ms",
    "instances",
    "max_queue_size",
    "backends",
)


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``visionserve serve`` can be told.

    ``port`` 0 asks the OS for a free port (the bound port is logged and returned by
    ``create_server``). ``max_decoded_pixels`` bounds height*width of any decoded image
    or mask (decompression bombs). ``intra_op_threads`` 0: the usable cores divided by
    the model's instances. ``workers``: threads decoding and pre/post-processing (0: the
    usable cores). ``max_concurrent_rpcs`` 0 means unbounded; past it gRPC answers
    RESOURCE_EXHAUSTED. ``max_streams``: open streaming calls; past it RESOURCE_EXHAUSTED.
    Admission control (``admission.py``): a model takes at most ``max_admitted`` requests
    (queued + running), or when 0, its measured capacity times ``admission_wait_ms``;
    ``admission_wait_ms`` 0 and ``max_admitted`` 0 turn it off.

    ``max_batch_size``, ``max_queue_delay_ms``, ``instances``, ``max_queue_size``: when
    set, they override every model's model.yaml. ``metrics_port``: None = no metrics
    endpoint, 0 = a free port. ``model_control``: "none" (load everything at start),
    "poll" (rescan the repository every ``poll_interval_s``; new versions are loaded,
    warmed, then swapped in), "explicit" (load/unload through the KServe repository
    RPCs; ``load_models`` at start, every model when empty). TLS: ``tls_cert`` +
    ``tls_key`` (PEM); ``tls_client_ca`` additionally requires client certificates
    signed by that CA (mutual TLS). ``auth_token``: require ``authorization: Bearer
    <token>`` on every RPC but health checks. ``backends``: when set, every model's
    backends in order of preference (e.g. ``("tensorrt", "onnxruntime-cuda")`` on a GPU
    node), instead of its model.yaml list.
    """

    repository: Path
    host: str = "127.0.0.1"
    port: int = 8001
    workers: int = 0
    max_message_bytes: int = 64 * MIB
    max_decoded_pixels: int = 40_000_000
    default_top_k: int = 5
    grace_period_s: float = 10.0
    intra_op_threads: int = 0
    max_concurrent_rpcs: int = 0
    max_streams: int = 2048
    admission_wait_ms: float = 1000.0
    max_admitted: int = 0
    warmup: bool = True
    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    instances: int | None = None
    max_queue_size: int | None = None
    metrics_port: int | None = None
    model_control: str = "none"
    poll_interval_s: float = 5.0
    load_models: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: str | None = field(default=None, repr=False)
    backends: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if not self.repository.is_dir():
            raise ValueError(
                f"repository must be an existing directory (REPO/<model>/model.yaml), "
                f"got {str(self.repository)!r}"
            )
        if not self.host:
            raise ValueError(
                "host must not be empty (e.g. 127.0.0.1, or 0.0.0.0 for all interfaces)"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 = pick a free port), got {self.port}")
        positive = ("max_message_bytes", "max_decoded_pixels", "default_top_k", "max_streams")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if self.intra_op_threads < 0:
            raise ValueError(
                f"intra_op_threads must be >= 0 (0 = the cores divided by the model's instances), got {self.intra_op_threads}"
            )
        if self.workers < 0 or self.max_admitted < 0 or self.admission_wait_ms < 0:
            raise ValueError(
                f"workers, max_admitted and admission_wait_ms must be >= 0 (0 = the usable "
                f"cores / derived / admission control off), got {self.workers}, "
                f"{self.max_admitted}, {self.admission_wait_ms}"
            )
        if self.max_concurrent_rpcs < 0:
            raise ValueError(
                f"max_concurrent_rpcs must be >= 0 (0 = unbounded), got {self.max_concurrent_rpcs}"
            )

        self._check_batching()
        self._check_serving()
        self._check_security()

    def _check_batching(self) -> None:
        for name in ("max_batch_size", "instances", "max_queue_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset: model.yaml), got {value}")
        if self.max_queue_delay_ms is not None and self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.backends is not None:
            object.__setattr__(self, "backends", tuple(self.backends))
            check_backends(self.backends)

    def _check_serving(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(
                f"metrics_port must be in 0..65535 (0 = a free port; unset = off), got {self.metrics_port}"
            )
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model_control must be one of {MODEL_CONTROL_MODES}, got {self.model_control!r}"
            )
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {self.poll_interval_s}")
        object.__setattr__(self, "load_models", tuple(self.load_models))

    def _check_security(self) -> None:
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
                if not Path(value).is_file():
                    raise ValueError(f"{name} must be an existing PEM file, got {str(value)!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both (PEM files) or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token must not be empty or blank (unset it to turn auth off)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def cpu_workers(self) -> int:
        """Threads decoding and pre/post-processing: ``workers``, or the usable cores."""
        if self.workers:
            return self.workers
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return len(cores) if cores else os.cpu_count() or 1

    def admission_policy(self) -> AdmissionPolicy:
        return AdmissionPolicy(self.admission_wait_ms / 1000.0, self.max_admitted)

    def request_limits(self) -> RequestLimits:
        """The request policy every model applies (pixel limit, default top-k)."""
        from visionserve.server.requests import RequestLimits

        return RequestLimits(self.max_decoded_pixels, self.default_top_k)

    def batching_overrides(self) -> dict[str, Any]:
        """The model.yaml batching fields this server overrides (unset ones left out)."""
        return {k: getattr(self, k) for k in BATCHING_OVERRIDES if getattr(self, k) is not None}

    @property
    def address(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def _convert(name: str, raw: str, var: str) -> Any:
    """Parse the value ``raw`` of the environment variable ``var`` to the type of ``name``."""
    kind = {f.name: f.type for f in fields(ServerSettings)}[name]
    kind = kind.removesuffix(" | None") if isinstance(kind, str) else kind
    try:
        if kind in ("int", int):
            return int(raw)
        if kind in ("float", float):
            return float(raw)
        if kind == "Path":
            return Path(raw)
        if kind in ("bool", bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind == "tuple[str, ...]":
            return tuple(item.strip() for item in raw.split(",") if item.strip())
    except ValueError as exc:
        raise ValueError(f"{var}={raw!r}: expected a {kind}") from exc
    return raw


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from ``VISIONSERVE_*`` environment variables, then ``overrides``.

    ``overrides`` values that are ``None`` are ignored (an unset CLI option). Where a
    ``VISIONSERVE_*`` variable is unset, the platform's (``PLATFORM_ENV_VARS``: PORT,
    and STORAGE_URI when it is a local path) gives the default.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, var in PLATFORM_ENV_VARS.items():
        raw = environ.get(var, "")
        if raw and "://" not in raw:  # STORAGE_URI before the storage initializer: no
            values[name] = _convert(name, raw, var)
    for name, var in ENV_VARS.items():
        if environ.get(var, "") != "":
            values[name] = _convert(name, environ[var], var)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "repository" not in values:
        remote = environ.get(PLATFORM_ENV_VARS["repository"], "")
        hint = (
            f" ({PLATFORM_ENV_VARS['repository']}={remote!r} is not a local folder: KServe's "
            f"storage initializer downloads it)"
            if remote
            else ""
        )
        raise ValueError(
            f"no model repository given: pass --repository DIR or set {ENV_VARS['repository']}{hint}"
        )
    return ServerSettings(**values)
