"""The gRPC server: VisionService + grpc.health.v1 + reflection on one port.

``create_server(settings)`` binds, starts, loads and warms every model, flips health
to SERVING and returns ``(server, port)``; ``serve(settings)`` does that, then blocks
until SIGTERM/SIGINT, flips health to NOT_SERVING and drains with a grace period.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from visionserve.protos import visionserve_pb2_grpc
from visionserve.server.repository import ModelRepository
from visionserve.server.served_model import ModelRegistry
from visionserve.server.service import SERVICE_NAME, VisionServicer
from visionserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name of one model: ``visionserve.v1.VisionService/<model>``."""
    return f"{SERVICE_NAME}/{model}"


class VisionServer:
    """A started server: the grpc.Server plus its health servicer and model registry.

    ``stop`` and ``wait_for_termination`` behave like ``grpc.Server``'s, except that
    ``stop`` first flips every health status to NOT_SERVING.
    """

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        registry: ModelRegistry,
    ) -> None:
        self.grpc_server = server
        self.port = port
        self.health = health_servicer
        self.registry = registry

    def stop(self, grace: float | None) -> threading.Event:
        """NOT_SERVING, then refuse new RPCs and give in-flight ones ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        return self.grpc_server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)

    def __enter__(self) -> VisionServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(None).wait()


def create_server(settings: ServerSettings) -> tuple[VisionServer, int]:
    """Bind ``settings.address``, start, load + warm the repository's models, go SERVING.

    Health is NOT_SERVING (and VisionService answers UNAVAILABLE) while models load.
    Returns the started server and the bound port (useful with port 0). A model that
    fails to load stops the server and raises.
    """
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="visionserve"),
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    registry = ModelRegistry()
    health_servicer = health.HealthServicer()
    health_servicer.set("", NOT_SERVING)
    health_servicer.set(SERVICE_NAME, NOT_SERVING)
    visionserve_pb2_grpc.add_VisionServiceServicer_to_server(
        VisionServicer(registry, settings), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(settings.address)
    except RuntimeError as exc:
        raise OSError(f"could not bind {settings.address}: {exc}") from exc
    if port == 0:
        raise OSError(f"could not bind {settings.address} (in use, or not an address of this host)")
    server.start()
    handle = VisionServer(server, port, health_servicer, registry)
    host = settings.address.rsplit(":", 1)[0]
    log.info("listening on %s:%d; loading models from %s", host, port, settings.repository)
    try:
        registry.load_all(
            ModelRepository(settings.repository), settings.intra_op_threads, settings.warmup
        )
    except BaseException:
        server.stop(None)
        raise
    for name in registry.names():
        health_servicer.set(model_health_name(name), SERVING)
        log.info("model %s ready (versions %s)", name, registry.versions(name))
    health_servicer.set(SERVICE_NAME, SERVING)
    health_servicer.set("", SERVING)
    log.info("SERVING %d model(s) on %s:%d", len(registry.names()), host, port)
    return handle, port


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
        server.registry.close()
        log.info("stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
