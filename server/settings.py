"""Server settings: one frozen object, checked at construction.

Each setting is declared once, as a field of :class:`ServerSettings` made with
:func:`~visionserve.server.settings_spec.setting`: its environment variable
(``VISIONSERVE_<NAME>``), its ``visionserve serve`` option and README's table derive from
that field. Environment variables are read in exactly one place, :func:`load_settings`;
explicit values (the CLI's options) win over them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionserve.server.admission import AdmissionPolicy
from visionserve.server.cores import IDLE, usable_cores
from visionserve.server.model_config import check_backends
from visionserve.server.sched_slice import MAX_SLICE_US, MIN_SLICE_US
from visionserve.server.settings_spec import Declared, declarations, parse_text, setting

if TYPE_CHECKING:  # requests imports cv2; settings must not (see decoder_guard)
    from visionserve.server.requests import RequestLimits

MIB = 1024 * 1024

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
# option groups of `visionserve serve --help`; the BATCHING ones override every model.yaml
BATCHING = "dynamic batching (overrides every model.yaml)"
ADMISSION = "admission control"
OPERATIONS = "operations"
SECURITY = "security"
YAML = "each model.yaml's"


def _token_from_file(path: str) -> str:
    """--auth-token-file: the token is the file's text, surrounding whitespace dropped."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"auth token file {path!r} could not be read: {exc.strerror}") from exc


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``visionserve serve`` can be told; each field's ``help`` says what it does.

    Admission control (``admission.py``): a model takes at most ``max_admitted`` requests
    (queued + running), or when 0, its measured capacity times ``admission_wait_ms``; both
    0 turn it off. ``model_control`` "poll": new versions are loaded, warmed, then swapped
    in; "explicit": ``load_models`` at start, every model when empty.
    """

    repository: Path = setting(
        help="model repository directory: REPO/MODEL/model.yaml",
        metavar="DIR",
        platform="STORAGE_URI",
    )
    host: str = setting("127.0.0.1", help="address to bind; 0.0.0.0 for all interfaces")
    port: int = setting(
        8001, help="port; 0 = pick a free one, printed on stdout", platform="PORT"
    )
    workers: int = setting(
        0, help="threads decoding and pre/post-processing requests; 0 = the usable cores"
    )
    max_message_bytes: int = setting(
        64 * MIB,
        flag="--max-message-mb",
        help="largest request/response message, in MiB",
        scale=MIB,
        env_note="in bytes",
    )
    max_decoded_pixels: int = setting(
        40_000_000,
        flag="--max-pixels",
        help="largest decoded image or mask, height*width: decompression bombs never decode",
    )
    default_top_k: int = setting(5, help="classes answered when a request asks for none")
    grace_period_s: float = setting(
        10.0, flag="--grace", help="seconds to drain in-flight requests on shutdown"
    )
    intra_op_threads: int = setting(
        0,
        help="ONNX Runtime threads per model instance; "
        "0 = the usable cores divided by the model's instances",
    )
    inference_nice: int = setting(
        10,
        help="CPU models compute this many priority steps (Linux nice) below the event loop "
        "and decoding: when the cores are all busy, refusals and health answers do not wait "
        "behind a batch, and inference still takes every idle cycle; 0 = the same priority; "
        "20 = the kernel's idle policy (SCHED_IDLE: any other thread of the server takes the "
        "core at once; for a server alone in its container, as busy processes in the same "
        "cgroup would leave inference almost nothing)",
    )
    front_slice_us: int = setting(
        100,
        help="the scheduler time slice (Linux >= 6.12) of the event loop, gRPC's threads and "
        "decoding, in microseconds (100..100000); the inference threads keep the kernel's "
        "default: woken, a front-end thread takes the core from a batch at once instead of "
        "after the batch's slice (1.4 ms on 2 cores); 0 = the kernel's default for all",
    )
    max_concurrent_rpcs: int = setting(
        0, help="calls in progress; past it gRPC answers RESOURCE_EXHAUSTED; 0 = unbounded"
    )
    accept_ahead: int = setting(
        16,
        group=OPERATIONS,
        help="calls taken from gRPC core ahead of the event loop per unary method (grpc.aio "
        "takes one at a time): under a flood of small requests they reach admission "
        "control (RESOURCE_EXHAUSTED) instead of waiting in core past their deadline; "
        "0 = grpc.aio's one; not with --max-concurrent-rpcs",
    )
    max_streams: int = setting(
        2048,
        group=OPERATIONS,
        help="open streaming calls (SegmentStream, SegmentBatches); "
        "past it RESOURCE_EXHAUSTED",
    )
    admission_wait_ms: float = setting(
        1000.0,
        group=ADMISSION,
        help="a model takes what its measured capacity serves within this wait; "
        "past it RESOURCE_EXHAUSTED at once; 0 = off",
    )
    max_admitted: int = setting(
        0,
        group=ADMISSION,
        help="a fixed limit of requests queued + running per model; "
        "0 = derived from capacity and --admission-wait-ms",
    )
    max_loop_lag_ms: float = setting(
        250.0,
        group=ADMISSION,
        help="while the event loop keeps running this far behind, new unary inference "
        "calls are answered RESOURCE_EXHAUSTED before their body is read (a flood of "
        "large images the front end cannot take in); 0 = off",
    )
    warmup: bool = setting(True, env_note="0 skips it", help="skip the warm-up inference at load")
    max_batch_size: int | None = setting(
        None, group=BATCHING, unset=YAML, help="largest batch sent to a backend"
    )
    max_queue_delay_ms: float | None = setting(
        None, group=BATCHING, unset=YAML, help="longest wait for a batch to fill, ms"
    )
    instances: int | None = setting(
        None, group=BATCHING, unset=YAML, help="batches run in parallel per model"
    )
    max_queue_size: int | None = setting(
        None,
        group=BATCHING,
        unset=YAML,
        help="waiting requests per model; past it RESOURCE_EXHAUSTED",
    )
    metrics_port: int | None = setting(
        None, group=OPERATIONS, unset="off", help="Prometheus /metrics HTTP port; 0 = a free one"
    )
    model_control: str = setting(
        "none",
        group=OPERATIONS,
        choices=MODEL_CONTROL_MODES,
        help="none: load every model at start; poll: rescan the repository and swap in new "
        "versions; explicit: load/unload through KServe RepositoryModelLoad/Unload",
    )
    poll_interval_s: float = setting(
        5.0, flag="--poll-interval", group=OPERATIONS, help="seconds between polls"
    )
    load_models: tuple[str, ...] = setting(
        (),
        flag="--load-model",
        env=False,  # a list of names: the option, given once per model
        repeat=True,
        metavar="NAME",
        group=OPERATIONS,
        unset="every model",
        help="explicit mode: load this model at start (repeatable)",
    )
    tls_cert: Path | None = setting(
        None, group=SECURITY, unset="no TLS", help="server certificate chain, PEM; enables TLS"
    )
    tls_key: Path | None = setting(
        None, group=SECURITY, unset="no TLS", help="server private key, PEM"
    )
    tls_client_ca: Path | None = setting(
        None,
        group=SECURITY,
        unset="no client certificates",
        help="CA bundle, PEM, for mutual TLS: require client certificates it signed",
    )
    auth_token: str | None = setting(
        None,
        repr=False,
        flag="--auth-token-file",
        from_flag=_token_from_file,
        env_note="the token itself",
        group=SECURITY,
        unset="no token asked",
        help="file holding the bearer token clients must send as authorization: Bearer TOKEN; "
        "health checks stay open",
    )
    backends: tuple[str, ...] | None = setting(
        None,
        group=BATCHING,
        unset="each model.yaml's list",
        help="backends to try in order for every model, comma-separated, "
        "e.g. tensorrt,onnxruntime-cuda",
    )

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
        if not 0 <= self.inference_nice <= IDLE:
            raise ValueError(
                f"inference_nice must be in 0..20 (priority steps below the server's other "
                f"threads; 0 = the same, 20 = the idle policy), got {self.inference_nice}"
            )
        if self.front_slice_us and not MIN_SLICE_US <= self.front_slice_us <= MAX_SLICE_US:
            raise ValueError(
                f"front_slice_us must be 0 (the kernel's default) or in {MIN_SLICE_US}.."
                f"{MAX_SLICE_US} (the slices the kernel takes), got {self.front_slice_us}"
            )
        if self.workers < 0 or self.max_admitted < 0 or self.admission_wait_ms < 0:
            raise ValueError(
                f"workers, max_admitted and admission_wait_ms must be >= 0 (0 = the usable "
                f"cores / derived / admission control off), got {self.workers}, "
                f"{self.max_admitted}, {self.admission_wait_ms}"
            )
        if self.max_concurrent_rpcs < 0 or self.accept_ahead < 0:
            raise ValueError(
                f"max_concurrent_rpcs and accept_ahead must be >= 0 (0 = unbounded / grpc.aio's "
                f"one call at a time), got {self.max_concurrent_rpcs}, {self.accept_ahead}"
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
        return usable_cores()

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


SETTINGS: tuple[Declared, ...] = tuple(declarations(ServerSettings))
_BY_NAME = {d.name: d for d in SETTINGS}
# Settings that override every model's model.yaml batching fields when set.
BATCHING_OVERRIDES = tuple(d.name for d in SETTINGS if d.spec.group == BATCHING)
# setting name -> environment variable (VISIONSERVE_<NAME>)
ENV_VARS = {d.name: d.env for d in SETTINGS if d.env}
# setting name -> what a platform sets when ours is unset: Knative (KServe Serverless)
# sets PORT to the container port; KServe's storage initializer rewrites the runtime
# container's STORAGE_URI to /mnt/models, where it put the InferenceService's storageUri.
PLATFORM_ENV_VARS = {d.name: d.spec.platform for d in SETTINGS if d.spec.platform}


def _from_environment(name: str, var: str, raw: str) -> Any:
    try:
        return parse_text(_BY_NAME[name].kind, raw)
    except ValueError as exc:
        raise ValueError(f"{var}: {exc}") from None


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
            values[name] = _from_environment(name, var, raw)
    for name, var in ENV_VARS.items():
        if environ.get(var, "") != "":
            values[name] = _from_environment(name, var, environ[var])
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
