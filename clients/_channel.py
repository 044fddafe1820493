"""Channel construction shared by the sync and asyncio clients: TLS, bearer token, limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from visionserve.clients._errors import RetryPolicy
from visionserve.protos import visionserve_pb2_grpc as pb_grpc

Pem = bytes | str | Path


def read_pem(value: Pem | None) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"certificate/key file {path} does not exist: expected a PEM file")
    return path.read_bytes()


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach a server.

    TLS is used when ``tls`` is true or any certificate is given: ``root_certificates``
    verifies the server (None: the system roots); ``private_key`` + ``certificate_chain``
    authenticate the client (mutual TLS). ``token`` is sent on every call as the
    metadata ``authorization: Bearer <token>``. ``server_name`` overrides the name the
    server's certificate is checked against (e.g. connecting to 127.0.0.1).
    """

    target: str
    root_certificates: Pem | None = None
    private_key: Pem | None = None
    certificate_chain: Pem | None = None
    token: str | None = None
    tls: bool = False
    server_name: str | None = None
    max_message_mb: int = 64

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must be HOST:PORT of a visionserve server, got ''")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError(
                "mutual TLS needs both private_key and certificate_chain, got only one"
            )
        if self.max_message_mb < 1:
            raise ValueError(f"max_message_mb must be >= 1, got {self.max_message_mb}")

    @property
    def secure(self) -> bool:
        return self.tls or any(
            v is not None
            for v in (self.root_certificates, self.private_key, self.certificate_chain)
        )

    def options(self) -> list[tuple[str, object]]:
        size = self.max_message_mb * 1024 * 1024
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.root_certificates),
            private_key=read_pem(self.private_key),
            certificate_chain=read_pem(self.certificate_chain),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.target, self.credentials(), options=self.options())
        return grpc.insecure_channel(self.target, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(self.target, self.credentials(), options=self.options())
        return grpc.aio.insecure_channel(self.target, options=self.options())


class ClientBase:
    """The constructor shared by :class:`VisionClient` and :class:`AsyncVisionClient`."""

    _asyncio = False

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        max_message_mb: int = 64,
        root_certificates: Pem | None = None,
        private_key: Pem | None = None,
        certificate_chain: Pem | None = None,
        token: str | None = None,
        tls: bool = False,
        server_name: str | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.config = ChannelConfig(
            target,
            root_certificates,
            private_key,
            certificate_chain,
            token,
            tls,
            server_name,
            max_message_mb,
        )
        self.retry_policy = retry_policy or RetryPolicy(retries=retries)
        self.timeout = timeout
        self.metadata = self.config.metadata()
        self._channel = self.config.aio_channel() if self._asyncio else self.config.channel()
        self.stub = pb_grpc.VisionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
