"""The gRPC server (grpc.aio): visionserve.v1 + KServe v2 + grpc.health.v1 + reflection on one port.

Requests are coroutines on one event loop, which runs in a thread of its own
(``visionserve-loop``), so ``create_server`` and the returned ``VisionServer`` are
plain synchronous objects for callers and tests. Decoding and pre/post-processing run
in a CPU pool sized to the usable cores (``--workers``), inference in each model's
batcher threads; the loop only translates messages and waits, so health checks and
metadata calls are answered at once however busy the models are.

``create_server(settings)`` binds (TLS when configured), starts, loads and warms the
models, flips health to SERVING and returns ``(server, port)``; ``serve(settings)``
does that, then blocks until SIGTERM/SIGINT and drains: health NOT_SERVING at once, new
calls refused with UNAVAILABLE, every admitted request answered, open streams told to
finish (each new item answered UNAVAILABLE in-band), all within the grace period.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from visionserve.protos import grpc_service_pb2_grpc, visionserve_pb2_grpc
from visionserve.server.acceptors import Acceptors
from visionserve.server.allocator import keep_large_blocks
from visionserve.server.backends.registry import describe
from visionserve.server.cores import describe_cores
from visionserve.server.decoder_guard import check_decoders
from visionserve.server.interceptors import (
    Gate,
    MalformedInterceptor,
    MetricsInterceptor,
    TokenAuthInterceptor,
)
from visionserve.server.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from visionserve.server.kserve import InferenceServicer
from visionserve.server.logs import quiet_grpc_repeats
from visionserve.server.metrics import Metrics
from visionserve.server.registry import ModelRegistry
from visionserve.server.repository import ModelRepository
from visionserve.server.sched_slice import shorten_front_end
from visionserve.server.service import SERVICE_NAME, Serving, VisionServicer
from visionserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_LINGER_S = 0.25
SIGNAL_POLL_S = 0.2  # how soon a signal caught on another thread is acted on
SERVICES = ("", SERVICE_NAME, KSERVE_SERVICE_NAME)
T = TypeVar("T")


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name of one model: ``visionserve.v1.VisionService/<model>``."""
    return f"{SERVICE_NAME}/{model}"


class EventLoopThread:
    """An asyncio event loop running in a daemon thread; ``call`` runs a coroutine on it."""

    def __init__(self, name: str = "visionserve-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T | None:
        """Run ``coro`` on the loop and wait for it; from the loop's own thread, schedule
        it and return None (waiting there would deadlock)."""
        if threading.current_thread() is self._thread:
            self.loop.create_task(coro)
            return None
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class VisionServer:
    """A started server: the aio server, its health servicer, model registry and metrics.

    ``stop(grace)`` drains as the module says and returns an event set once the server
    has stopped; ``close`` then releases the models, the CPU pool, the metrics endpoint
    and the event loop.
    """

    def __init__(
        self, settings: ServerSettings, loop: EventLoopThread, metrics: Metrics, gate: Gate
    ) -> None:
        self.settings = settings
        self.port = 0
        self.metrics_port: int | None = None
        self.metrics = metrics
        self.gate = gate
        self.draining = threading.Event()
        self.stopped = threading.Event()
        self.executor = ThreadPoolExecutor(
            max_workers=settings.cpu_workers(), thread_name_prefix="visionserve-cpu"
        )
        self._loop = loop
        self._poller: threading.Thread | None = None
        self._lag_watch: asyncio.Task | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.registry = ModelRegistry(
            intra_op_threads=settings.intra_op_threads,
            warmup=settings.warmup,
            overrides=settings.batching_overrides(),
            metrics=metrics,
            on_change=self.set_model_health,
            drain_timeout=max(settings.grace_period_s, 1.0),
            limits=settings.request_limits(),
            admission=settings.admission_policy(),
            inference_nice=settings.inference_nice,
        )
        gate.full = self.registry.refusal_unread

    def is_ready(self) -> bool:
        return self.registry.ready and not self.draining.is_set()

    def set_health(self, name: str, serving: bool) -> None:
        """Set one health service's status (from any thread)."""
        self._loop.call(self.health.set(name, SERVING if serving else NOT_SERVING))

    def set_model_health(self, name: str, serving: bool) -> None:
        if not self.draining.is_set():
            self.set_health(model_health_name(name), serving)

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

    async def start_grpc(self) -> int:
        """Build the aio server on the loop, add the services, bind and start it."""
        interceptors = _interceptors(self.settings, self.metrics, self.gate)
        server = _grpc_server(self.settings, interceptors)
        # gRPC's --max-concurrent-rpcs limiter counts only the calls its own loop takes
        extra = 0 if self.settings.max_concurrent_rpcs else self.settings.accept_ahead
        self.acceptors = Acceptors(server, interceptors, extra)
        self.acceptors.record()
        self.grpc_server = server
        serving = Serving(self.registry, self.settings, self.executor, lambda: self.gate.draining)
        visionserve_pb2_grpc.add_VisionServiceServicer_to_server(VisionServicer(serving), server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(serving, self.is_ready), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, KSERVE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
        for name in SERVICES:
            await self.health.set(name, NOT_SERVING)
        self.port = _bind(server, self.settings)
        await server.start()
        self.acceptors.start()
        if self.gate.max_lag_s:
            self._lag_watch = asyncio.get_running_loop().create_task(self.gate.watch_loop())
        return self.port

    def stop(self, grace: float | None) -> threading.Event:
        """Drain within ``grace`` s (None: stop at once); the event is set once stopped."""
        self.draining.set()
        if self._poller is not None:
            self._poller.join()
        if self.grpc_server is None or self.stopped.is_set():
            self.stopped.set()
            return self.stopped
        done = self._loop.submit(self._stop(grace))
        done.add_done_callback(lambda _: self.stopped.set())
        return self.stopped

    async def _stop(self, grace: float | None) -> None:
        assert self.grpc_server is not None
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        await self.health.enter_graceful_shutdown()
        if grace is None:
            self.gate.draining = True
            await self.grpc_server.stop(None)
            await self.acceptors.stop()
            return
        end = time.monotonic() + grace
        if not await self.gate.drain(grace):
            log.warning("grace period over with requests still in flight: cancelling them")
        # Linger a moment, refusing stragglers with UNAVAILABLE: calls arriving while the
        # transport shuts down would otherwise be CANCELLED by gRPC core.
        await asyncio.sleep(max(0.0, min(DRAIN_LINGER_S, end - time.monotonic())))
        await self.grpc_server.stop(max(0.0, end - time.monotonic()))
        await self.acceptors.stop()

    def close(self) -> None:
        """After ``stop``: drain and close every model, the pool, metrics, the loop."""
        self.registry.close()
        self.metrics.close()
        self.executor.shutdown(wait=True)
        self._loop.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)

    def __enter__(self) -> VisionServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(None).wait()
        self.close()


def _bind(server: grpc.aio.Server, settings: ServerSettings) -> int:
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


def _interceptors(
    settings: ServerSettings, metrics: Metrics, gate: Gate
) -> list[grpc.aio.ServerInterceptor]:
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics)]
    if settings.auth_token:
        interceptors.append(TokenAuthInterceptor(settings.auth_token))
    return interceptors + [gate, MalformedInterceptor()]


def _grpc_server(
    settings: ServerSettings, interceptors: list[grpc.aio.ServerInterceptor]
) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the port fails, not shares it
            *pending_call_limits(settings.max_streams),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )


def pending_call_limits(max_streams: int) -> list[tuple[str, int]]:
    """gRPC core's bounds on calls not yet taken by the server (grpc.aio takes a stream
    call at a time, and unary calls ``--accept-ahead`` at a time): past the soft bound core
    drops new calls at random, all of them past the hard one, before any handler sees
    them (the client gets CANCELLED, or INTERNAL "Internal error from Core" on a stream's
    first write). Core's defaults (1,000, 3,000) dropped 35 of 1,500 and 130-290 of 2,000
    streams opened at once, under ``--max-streams`` 2,048: room for ``max_streams``
    more, so every stream up to the limit reaches the server (2,000 at once: all
    answered; 3,000: 2,048 answered, 952 refused RESOURCE_EXHAUSTED naming the limit),
    and the same room as core's defaults for the unary calls besides."""
    soft = max_streams + 1000
    return [
        ("grpc.server.max_pending_requests", soft),
        ("grpc.server.max_pending_requests_hard_limit", soft + 2000),
    ]


def create_server(settings: ServerSettings) -> tuple[VisionServer, int]:
    """Bind ``settings.address``, start, load + warm the repository's models, go SERVING.

    Health is NOT_SERVING (and the services answer UNAVAILABLE) while models load.
    Returns the started server and the bound port (useful with port 0). A model that
    fails to load is NOT_SERVING (per-model health) and logged; the others serve. A port
    already in use raises ``OSError`` (gRPC's SO_REUSEPORT is turned off).
    """
    check_decoders(settings.max_decoded_pixels)
    quiet_grpc_repeats()
    metrics = Metrics()
    gate = Gate(
        settings.max_streams,
        on_refused=lambda reason: metrics.shed.labels("", reason).inc(),
        max_lag_s=settings.max_loop_lag_ms / 1e3,
    )
    loop = EventLoopThread()
    handle = VisionServer(settings, loop, metrics, gate)
    try:
        port = loop.call(handle.start_grpc())
        _load(handle, settings)
    except BaseException:
        handle.stop(None).wait(10)
        handle.close()
        raise
    for name in SERVICES:
        handle.set_health(name, True)
    log.info(
        "SERVING %d model(s) on %s:%d (%s)",
        len(handle.registry.names()),
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


def _wait_for_signal(stop_requested: threading.Event) -> None:
    """Wait in the main thread for ``on_signal``, waking every ``SIGNAL_POLL_S``.

    The kernel may run a process-directed signal's C handler on any thread that does not
    block it (ONNX Runtime's, gRPC's); CPython then runs the Python handler only when the
    main thread next takes the GIL. A main thread blocked in ``Event.wait()`` with no
    timeout never does: the SIGTERM was caught and never acted on (a server that ignored
    it until SIGKILL, seen in CI).
    """
    while not stop_requested.wait(SIGNAL_POLL_S):
        pass


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
    log.info("%s", keep_large_blocks())  # megabyte requests reuse memory (allocator.py)
    # before any other thread starts: the event loop, gRPC's threads and the decode pool
    # preempt a batch's threads at once when they wake (sched_slice)
    slice_us = settings.front_slice_us
    short = slice_us > 0 and shorten_front_end(slice_us * 1000)
    log.info(
        "%s; %d decode workers; the front end's threads on %s",
        describe_cores(),
        settings.cpu_workers(),
        f"a {slice_us / 1000:g} ms scheduler slice" if short else "the kernel's default slice",
    )
    try:
        server, port = create_server(settings)
        # What start-up made (modules, models, gRPC) lives as long as the process: out
        # of the cyclic collector's sight, a full collection under load scans only what
        # requests made (measured: 16-60 ms pauses of the event loop with ~50,000
        # start-up objects, under a 2x flood)
        gc.freeze()
        if on_ready is not None:
            on_ready(settings.host, port)
        _wait_for_signal(stop_requested)
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
