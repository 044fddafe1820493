"""Server settings: one frozen object, checked at construction.

Environment variables (``VISIONSERVE_*``) are read in exactly one place,
:func:`load_settings`; explicit values (the CLI's options) win over them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

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
}


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``visionserve serve`` can be told.

    ``port`` 0 asks the OS for a free port (the bound port is logged and returned by
    ``create_server``). ``max_decoded_pixels`` bounds height*width of any decoded image
    or mask (decompression bombs). ``intra_op_threads`` 0 lets ONNX Runtime decide.
    ``max_concurrent_rpcs`` 0 means unbounded; past it gRPC answers RESOURCE_EXHAUSTED.
    """

    repository: Path
    host: str = "127.0.0.1"
    port: int = 8001
    workers: int = 8
    max_message_bytes: int = 64 * MIB
    max_decoded_pixels: int = 40_000_000
    default_top_k: int = 5
    grace_period_s: float = 10.0
    intra_op_threads: int = 0
    max_concurrent_rpcs: int = 0
    warmup: bool = True

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
        positive = ("workers", "max_message_bytes", "max_decoded_pixels", "default_top_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if self.intra_op_threads < 0:
            raise ValueError(
                f"intra_op_threads must be >= 0 (0 = ONNX Runtime decides), got {self.intra_op_threads}"
            )
        if self.max_concurrent_rpcs < 0:
            raise ValueError(
                f"max_concurrent_rpcs must be >= 0 (0 = unbounded), got {self.max_concurrent_rpcs}"
            )

    @property
    def address(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def _convert(name: str, raw: str) -> Any:
    """Parse one environment value to the type of the setting ``name``."""
    kind = {f.name: f.type for f in fields(ServerSettings)}[name]
    try:
        if kind in ("int", int):
            return int(raw)
        if kind in ("float", float):
            return float(raw)
        if kind in ("bool", bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError as exc:
        raise ValueError(f"{ENV_VARS[name]}={raw!r}: expected a {kind}") from exc
    return raw


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from ``VISIONSERVE_*`` environment variables, then ``overrides``.

    ``overrides`` values that are ``None`` are ignored (an unset CLI option).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        if environ.get(var, "") != "":
            values[name] = _convert(name, environ[var])
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "repository" not in values:
        raise ValueError(
            f"no model repository given: pass --repository DIR or set {ENV_VARS['repository']}"
        )
    return ServerSettings(**values)
