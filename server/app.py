"""The gRPC server: visionserve.v1 + KServe v2 + grpc.health.v1 + reflection on one port.

``create_server(settings)`` binds (TLS when configured), starts, loads and warms the
models, flips health to SERVING and returns ``(server, port)``; ``serve(settings)``
does that, then blocks until SIGTERM/SIGINT, flips health to NOT_SERVING, refuses new
RPCs and lets every accepted one finish within the grace period.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from visionserve.protos import grpc_service_pb2_grpc, visionserve_pb2_grpc
from visionserve.server.backends.registry import describe
from visionserve.server.decoder_guard import check_decoders
from visionserve.server.interceptors import (
    DrainInterceptor,
    MetricsInterceptor,
    TokenAuthInterceptor,
)
from visionserve.server.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from visionserve.server.kserve import InferenceServicer
from visionserve.server.metrics import Metrics
from visionserve.server.registry import ModelRegistry
from visionserve.server.repository import ModelRepository
from visionserve.server.service import SERVICE_NAME, VisionServicer
from visionserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_LINGER_S = 0.25


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name of one model: ``visionserve.v1.VisionService/<model>``."""
    return f"{SERVICE_NAME}/{model}"


class VisionServer:
    """A started server: the grpc.Server, its health servicer, model registry and metrics.

    ``stop`` behaves like ``grpc.Server.stop`` but first flips every health status to
    NOT_SERVING and stops the repository poller; ``close`` then releases the models
    and the metrics endpoint.
    """

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        registry: ModelRegistry,
        metrics: Metrics,
        gate: DrainInterceptor,
    ) -> None:
        self.grpc_server = server
        self.port = port
        self.health = health_servicer
        self.registry = registry
        self.metrics = metrics
        self.gate = gate
        self.metrics_port: int | None = None
        self.draining = threading.Event()
        self._poller: threading.Thread | None = None

    def is_ready(self) -> bool:
        return self.registry.ready and not self.draining.is_set()

    def set_model_health(self, name: str, serving: bool) -> None:
        if not self.draining.is_set():
            self.health.set(model_health_name(name), SERVING if serving else NOT_SERVING)

    def start_polling(self, repository: ModelRepository, interval: float) -> None:
        """Rescan ``repository`` every ``interval`` seconds until ``stop``."""

        def poll() -> None:
            while not self.draining.wait(interval):
                try:
                    changed = self.registry.sync(repository)
                except Exception:
                    log.exception("repository poll failed; the loaded models keep serving")
                    continue
                if changed:
                    log.info("repository poll: reloaded %s", changed)

        self._poller = threading.Thread(target=poll, name="repository-poller", daemon=True)
        self._poller.start()

    def stop(self, grace: float | None) -> threading.Event:
        """NOT_SERVING; refuse new RPCs (UNAVAILABLE) and give in-flight ones ``grace`` s.

        With a grace period this blocks until the requests in flight are done (or the
        grace period is over), then stops the gRPC server with what is left of it.
        """
        self.draining.set()
        self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.join()
        if grace is None:
            return self.grpc_server.stop(None)
        end = time.monotonic() + grace
        if not self.gate.drain(grace):
            log.warning("grace period over with requests still in flight: cancelling them")
        # Linger a moment, refusing stragglers with UNAVAILABLE: calls arriving while the
        # transport shuts down would otherwise be CANCELLED by gRPC core.
        time.sleep(max(0.0, min(DRAIN_LINGER_S, end - time.monotonic())))
        return self.grpc_server.stop(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        """After ``stop``: drain and close every model, stop the metrics endpoint."""
        self.registry.close()
        self.metrics.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)

    def __enter__(self) -> VisionServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(None).wait()
        self.close()


def _bind(server: grpc.Server, settings: ServerSettings) -> int:
    try:
        if settings.tls:
            client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(settings.address, credentials)
        else:
            port = server.add_insecure_port(settings.address)
    except RuntimeError as exc:
        raise OSError(f"could not bind {settings.address}: {exc}") from exc
    if port == 0:
        raise OSError(f"could not bind {settings.address} (in use, or not an address of this host)")
    return port


def _grpc_server(settings: ServerSettings, metrics: Metrics, gate: DrainInterceptor) -> grpc.Server:
    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(metrics), gate]
    if settings.auth_token:
        interceptors.append(TokenAuthInterceptor(settings.auth_token))
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="visionserve"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the port fails, not shares it
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )


def create_server(settings: ServerSettings) -> tuple[VisionServer, int]:
    """Bind ``settings.address``, start, load + warm the repository's models, go SERVING.

    Health is NOT_SERVING (and the services answer UNAVAILABLE) while models load.
    Returns the started server and the bound port (useful with port 0). A model that
    fails to load is NOT_SERVING (per-model health) and logged; the others serve. A port
    already in use raises ``OSError`` (gRPC's SO_REUSEPORT is turned off).
    """
    check_decoders(settings.max_decoded_pixels)
    metrics, gate = Metrics(), DrainInterceptor()
    server = _grpc_server(settings, metrics, gate)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME, KSERVE_SERVICE_NAME):
        health_servicer.set(name, NOT_SERVING)
    handle: VisionServer | None = None
    registry = ModelRegistry(
        intra_op_threads=settings.intra_op_threads,
        warmup=settings.warmup,
        overrides=settings.batching_overrides(),
        metrics=metrics,
        on_change=lambda name, serving: handle.set_model_health(name, serving) if handle else None,
        drain_timeout=max(settings.grace_period_s, 1.0),
        limits=settings.request_limits(),
    )
    handle = VisionServer(server, 0, health_servicer, registry, metrics, gate)
    visionserve_pb2_grpc.add_VisionServiceServicer_to_server(
        VisionServicer(registry, settings), server
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(registry, settings, handle.is_ready), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, KSERVE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    handle.port = port = _bind(server, settings)
    server.start()
    try:
        _load(handle, settings)
    except BaseException:
        server.stop(None)
        handle.close()
        raise
    for name in ("", SERVICE_NAME, KSERVE_SERVICE_NAME):
        health_servicer.set(name, SERVING)
    log.info(
        "SERVING %d model(s) on %s:%d (%s)",
        len(registry.names()),
        settings.host,
        port,
        "TLS" if settings.tls else "plaintext",
    )
    return handle, port


def _load(handle: VisionServer, settings: ServerSettings) -> None:
    repository = ModelRepository(settings.repository)
    log.info("listening on port %d; loading models from %s", handle.port, settings.repository)
    if settings.metrics_port is not None:
        handle.metrics_port = handle.metrics.serve_http(settings.host, settings.metrics_port)
    names = list(settings.load_models) or None if settings.model_control == "explicit" else None
    handle.registry.load_all(repository, names)
    for name in handle.registry.names():
        for version in handle.registry.versions(name):
            backend = handle.registry.get(name, str(version)).backend
            log.info("model %s v%d ready on %s", name, version, describe(backend))
    if settings.model_control == "poll":
        handle.start_polling(repository, settings.poll_interval_s)


def serve(settings: ServerSettings, on_ready: Callable[[str, int], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain for ``settings.grace_period_s``; returns 0.

    Must be called from the main thread (signal handlers). ``on_ready(host, port)`` is
    called once every model is SERVING.
    """
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server, port = create_server(settings)
        if on_ready is not None:
            on_ready(settings.host, port)
        stop_requested.wait()
        log.info(
            "NOT_SERVING; draining in-flight requests for up to %.1f s", settings.grace_period_s
        )
        server.stop(settings.grace_period_s).wait()
        server.close()
        log.info("stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
