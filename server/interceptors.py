"""Server interceptors: bearer-token auth, metrics + access logs, drain on shutdown.

Both wrap the method handler of the same kind (unary or streaming) that the server
would have used, so they work for every service on the port.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from visionserve.server.metrics import Metrics

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."

Behavior = Callable[..., Any]


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool], Behavior]):
    """A copy of ``handler`` whose behaviour is ``wrap(behaviour, streams_responses)``."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attribute, factory, streams in kinds:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return factory(
                wrap(behavior, streams),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class _PerMethod:
    """Wrapped handlers cached per method: gRPC asks the interceptors for every call,
    and the server hands them the same handler object for a method each time, so the
    wrapping (new closures and a new handler) is done once per method, not per call."""

    def __init__(self, wrap: Callable[[str, Behavior, bool], Behavior]) -> None:
        self._wrap = wrap
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _rewrap(handler, lambda behavior, streams: self._wrap(method, behavior, streams))
        self._cache[method] = (handler, wrapped)  # a benign race: both copies are equal
        return wrapped


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` metadata; health checks are exempt.

    The comparison is constant-time (``hmac.compare_digest``); anything else is
    answered UNAUTHENTICATED before the servicer runs.
    """

    def __init__(self, token: str, exempt: tuple[str, ...] = (HEALTH_PREFIX,)) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        supplied = next(
            (v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"),
            "",
        )
        if isinstance(supplied, str):
            supplied = supplied.encode()
        if hmac.compare_digest(supplied, self._expected):
            return handler
        reason = "no authorization metadata" if not supplied else "a wrong bearer token"
        message = (
            f"{method}: {reason}; expected metadata 'authorization: Bearer <token>' "
            f"with the server's token"
        )

        def deny(behavior: Behavior, streams: bool) -> Behavior:
            def refuse(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return refuse

        return _rewrap(handler, deny)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Count requests, failures by code, in-flight and latency; log failures with fields."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._handlers = _PerMethod(self._observe)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith((HEALTH_PREFIX, REFLECTION_PREFIX)):
            return handler
        return self._handlers.get(method, handler)

    def _observe(self, method: str, behavior: Behavior, streams: bool) -> Behavior:
        # The metric children of this method, looked up once (labels() takes a lock).
        requests = self._metrics.requests.labels(method)
        in_flight = self._metrics.in_flight.labels(method)
        latency = self._metrics.latency.labels(method)

        def finish(start: float, code: grpc.StatusCode) -> None:
            seconds = time.perf_counter() - start
            in_flight.dec()
            latency.observe(seconds)
            self._log(method, seconds, code)

        if streams:

            def observed_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                requests.inc()
                in_flight.inc()
                start, code = time.perf_counter(), grpc.StatusCode.OK
                try:
                    yield from behavior(request, context)
                    code = context.code() or grpc.StatusCode.OK
                except BaseException:
                    code = context.code() or grpc.StatusCode.CANCELLED
                    raise
                finally:
                    finish(start, code)

            return observed_stream

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            requests.inc()
            in_flight.inc()
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                response = behavior(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except BaseException:
                code = context.code() or grpc.StatusCode.INTERNAL
                raise
            finally:
                finish(start, code)

        return observed

    def _log(self, method: str, seconds: float, code: grpc.StatusCode) -> None:
        if code == grpc.StatusCode.OK:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "rpc %s OK after %.1f ms",
                    method,
                    seconds * 1e3,
                    extra=_fields(method, code, seconds),
                )
            return
        self._metrics.failures.labels(method, code.name).inc()
        log.info(
            "rpc %s failed: %s after %.1f ms",
            method,
            code.name,
            seconds * 1e3,
            extra=_fields(method, code, seconds),
        )


def _fields(method: str, code: grpc.StatusCode, seconds: float) -> dict[str, Any]:
    return {"method": method, "code": code.name, "duration_ms": round(seconds * 1e3, 3)}


class DrainInterceptor(grpc.ServerInterceptor):
    """Counts RPCs in flight; once ``drain()`` is called, refuses new ones with UNAVAILABLE.

    Health checks pass through (they report NOT_SERVING by then). Refusing from the
    handler, while the port still accepts connections, gives late clients a clean,
    retryable UNAVAILABLE instead of a connection torn down under them.
    """

    def __init__(self) -> None:
        self._in_flight = 0
        self._draining = False
        self._idle = threading.Condition()
        self._handlers = _PerMethod(self._track)

    def drain(self, timeout: float | None) -> bool:
        """Refuse new RPCs; wait up to ``timeout`` for those in flight. True when idle."""
        with self._idle:
            self._draining = True
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith((HEALTH_PREFIX, REFLECTION_PREFIX)):
            return handler
        return self._handlers.get(method, handler)

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self._idle:
            if not self._draining:
                self._in_flight += 1
                return
        context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{method}: the server is shutting down and accepts no new requests; retry on "
            f"another replica",
        )

    def _exit(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def _track(self, method: str, behavior: Behavior, streams: bool) -> Behavior:
        if streams:

            def tracked_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._enter(method, context)
                try:
                    yield from behavior(request, context)
                finally:
                    self._exit()

            return tracked_stream

        def tracked(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter(method, context)
            try:
                return behavior(request, context)
            finally:
                self._exit()

        return tracked
