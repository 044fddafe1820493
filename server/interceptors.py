"""grpc.aio server interceptors: metrics + rate-limited failure logs, auth, drain + stream limit.

Order on the server (outermost first): ``MetricsInterceptor`` (counts every call,
refusals included), ``TokenAuthInterceptor``, ``Gate`` (drain, ``--max-streams``),
``MalformedInterceptor`` (request bytes that do not parse).

A call refused before its handler runs (wrong token, draining, too many streams) gets
a handler that takes its request as a *stream* and never reads it: gRPC then does not
buffer the request body (a 64 MiB message from a client without the token is refused
after the first flow-control window, not after 64 MiB were received and parsed).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from visionserve.server.logs import FailureLog
from visionserve.server.metrics import Metrics

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
EXEMPT = (HEALTH_PREFIX, REFLECTION_PREFIX)
LAG_TICK_S = 0.02  # how often the loop's lag is sampled
# Unary calls that carry images or tensors, and the task of the models that take them
# (None: any): refused unread while the loop lags or every such model is full
INFERENCE = {
    "/visionserve.v1.VisionService/Classify": "classification",
    "/visionserve.v1.VisionService/Segment": "segmentation",
    "/inference.GRPCInferenceService/ModelInfer": None,
}

Behavior = Callable[..., Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behavior_of(handler: grpc.RpcMethodHandler) -> Behavior:
    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary"
    )
    return getattr(handler, kind)


def _streaming(handler: grpc.RpcMethodHandler) -> bool:
    return handler.request_streaming or handler.response_streaming


def rewrap(
    handler: grpc.RpcMethodHandler,
    behavior: Behavior,
    *,
    request_streaming: bool | None = None,
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler like ``handler`` with another behaviour (and maybe request kind)."""
    streaming = handler.request_streaming if request_streaming is None else request_streaming
    return _FACTORIES[(streaming, handler.response_streaming)](
        behavior,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class PerMethod:
    """Wrapped handlers cached per method: the server hands an interceptor the same
    handler object for a method on every call, so wrapping is done once per method
    (a refusal, a new handler each time, is simply wrapped again)."""

    def __init__(
        self, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]
    ) -> None:
        self._wrap = wrap
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._cache[method] = (handler, wrapped)
        return wrapped


def set_error(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Make ``code`` and ``message`` the call's answer; the handler then returns (None, or
    ends its response stream): gRPC sends the status and discards any reply.

    Not ``context.abort``: the exception it raises is kept by the call's state and its
    traceback keeps the handlers' frames, so every refused call left a reference cycle
    holding its request body (~32 objects; a 110 KB image) until a garbage collection,
    whose pauses (2-26 ms, 60 ms for a full one) fell on the event loop under a flood."""
    context.set_code(code)
    context.set_details(message)


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler answering ``code`` at once, without reading the request body."""

    async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        set_error(context, code, message)

    return rewrap(handler, refuse, request_streaming=True)


def observe(behavior: Behavior, streams: bool, before: Callable, after: Callable) -> Behavior:
    """``behavior`` with ``before(context)`` and ``after(context, error)`` around it.

    Response streams become async generators whatever they were (a coroutine writing
    with ``context.write`` included)."""
    if not streams:

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            before(context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                after(context, error)

        return unary

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        before(context)
        error: BaseException | None = None
        try:
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:
                await result
        except BaseException as exc:
            error = exc
            raise
        finally:
            after(context, error)

    return stream


def code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some versions report the raw integer
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Requests, failures by code, in flight and latency per method; one log line per
    failure class (method, code) per interval under overload (``logs.FailureLog``)."""

    def __init__(self, metrics: Metrics, failures: FailureLog | None = None) -> None:
        self._metrics = metrics
        self._failures = failures or FailureLog(log)
        self._handlers = PerMethod(
            lambda method, handler: rewrap(handler, self._observed(method, handler))
        )

    async def intercept_service(self, continuation: Continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(EXEMPT):
            return handler
        return self._handlers.get(method, handler)

    def _observed(self, method: str, handler: grpc.RpcMethodHandler) -> Behavior:
        requests = self._metrics.requests.labels(method)
        in_flight = self._metrics.in_flight.labels(method)
        latency = self._metrics.latency.labels(method)
        starts: dict[int, float] = {}

        def before(context: grpc.aio.ServicerContext) -> None:
            requests.inc()
            in_flight.inc()
            starts[id(context)] = time.perf_counter()

        def after(context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            seconds = time.perf_counter() - starts.pop(id(context))
            in_flight.dec()
            latency.observe(seconds)
            code = code_of(context, error)
            if code == grpc.StatusCode.OK and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "rpc %s OK after %.1f ms",
                    method,
                    seconds * 1e3,
                    extra={"method": method, "code": "OK", "duration_ms": round(seconds * 1e3, 3)},
                )
            elif code != grpc.StatusCode.OK:
                self._metrics.failures.labels(method, code.name).inc()
                self._failures.failed(method, code.name, seconds)

        return observe(behavior_of(handler), handler.response_streaming, before, after)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` metadata; health checks are exempt.

    Checked from the call's metadata before its body is read; the comparison is
    constant-time (``hmac.compare_digest``)."""

    def __init__(self, token: str, exempt: tuple[str, ...] = (HEALTH_PREFIX,)) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt

    async def intercept_service(self, continuation: Continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        supplied = next(
            (v for k, v in details.invocation_metadata or () if k == "authorization"), ""
        )
        if isinstance(supplied, str):
            supplied = supplied.encode()
        if hmac.compare_digest(supplied, self._expected):
            return handler
        reason = "no authorization metadata" if not supplied else "a wrong bearer token"
        return refusal(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{method}: {reason}; expected metadata 'authorization: Bearer <token>' "
            f"with the server's token",
        )


class Gate(grpc.aio.ServerInterceptor):
    """Counts calls in flight and open streams (event-loop only, no locks).

    ``drain()`` refuses new calls with UNAVAILABLE (health and reflection pass) and waits
    for those in flight; the servicers read ``draining`` to answer new stream items
    UNAVAILABLE in-band. Past ``max_streams`` open streaming calls, a new one is refused
    with RESOURCE_EXHAUSTED naming the limit. While the event loop runs more than
    ``max_lag_s`` behind (``watch_loop``), a new unary inference call (``INFERENCE``) is
    refused RESOURCE_EXHAUSTED before its body is read: under a flood of large images
    the front end, not the model, is what is full, and reading a body only to refuse it
    is most of a refusal's cost. 3 MB PNGs to the tiny classifier at 170/s for 20 s on
    2 cores (about twice what it answered), alternating runs: goodput 0.05 and 0.05 of
    capacity without it (760-1,409 DEADLINE_EXCEEDED, refusals after 1.7-1.8 s, 2.8-3.3
    GB resident), 0.47 and 0.64 with it (240 and 0 DEADLINE_EXCEEDED, refusals after
    0.1-0.5 s, 1.7-2.1 GB).

    ``full(task)`` (the registry's ``refusal_unread``) refuses a new unary inference call
    RESOURCE_EXHAUSTED unread too while every model that could take it is at its
    admission limit: the refusal the model would give, without the body's transfer and
    parse and one more trip through gRPC's threads (a call naming a model that does not
    exist is then refused for capacity rather than NOT_FOUND). ResNet-18, 110 KB PNGs at
    2x capacity for 20 s on 2 cores, 3 runs each, alternating: refusals p50 0.86-0.96 ms,
    p99 4.61-5.04 ms with it; 1.25-1.51 and 5.38-6.13 ms without."""

    def __init__(
        self,
        max_streams: int,
        on_refused: Callable[[str], None] | None = None,
        max_lag_s: float = 0.0,
    ) -> None:
        self.max_streams = max_streams
        self.max_lag_s = max_lag_s
        self.full: Callable[[str | None], str | None] | None = None  # set by the server
        self.draining = False
        self.in_flight = 0
        self.streams = 0
        self.lag_s = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_refused = on_refused or (lambda reason: None)
        self._handlers = PerMethod(self._counted)

    async def watch_loop(self, tick: float = LAG_TICK_S) -> None:
        """Keep ``lag_s``: how late the loop woke a sleeper, the second latest of the last
        four ticks, so a loop that keeps falling behind counts and one stall (the calls it
        held then taken at once) does not.

        Under a flood of 3 MB bodies ticks came 0-1 s late with on-time ones among them
        (122 ticks in 12 s): a gate on two late ticks in a row hardly fired (32-65 of ~2,900
        calls refused, 1,679-1,919 DEADLINE_EXCEEDED); on any late tick it did (262-364, 0)."""
        loop, lates = asyncio.get_running_loop(), deque([0.0] * 4, maxlen=4)
        while True:
            start = loop.time()
            await asyncio.sleep(tick)
            lates.append(max(0.0, loop.time() - start - tick))
            self.lag_s = sorted(lates)[-2]

    async def drain(self, timeout: float | None) -> bool:
        """Refuse new calls; wait up to ``timeout`` s for those in flight. True: idle."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def intercept_service(self, continuation: Continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(EXEMPT):
            return handler
        if self.draining:
            self._on_refused("draining")
            return refusal(
                handler,
                grpc.StatusCode.UNAVAILABLE,
                f"{method}: the server is shutting down and accepts no new requests; retry "
                f"on another replica",
            )
        if self.max_lag_s and self.lag_s > self.max_lag_s and method in INFERENCE:
            self._on_refused("loop")
            return refusal(
                handler,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{method}: the server is {self.lag_s * 1e3:.0f} ms behind with the calls it "
                f"has (--max-loop-lag-ms {self.max_lag_s * 1e3:.0f}); retry later or on "
                f"another replica",
            )
        if self.full is not None and method in INFERENCE:
            message = self.full(INFERENCE[method])
            if message is not None:
                return refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return self._handlers.get(method, handler)

    def _counted(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming = _streaming(handler)
        behavior = behavior_of(handler)
        if not streaming:
            return rewrap(
                handler,
                observe(behavior, False, lambda c: self._enter(False), lambda c, e: self._exit(False)),
            )

        async def limited(request_iterator: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            if self.streams >= self.max_streams:
                self._on_refused("streams")
                set_error(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{method}: {self.streams} streams are open, the server's limit "
                    f"(--max-streams {self.max_streams}); retry later or on another replica",
                )
                return
            self._enter(True)
            try:
                async for response in behavior(request_iterator, context):
                    yield response
            finally:
                self._exit(True)

        return rewrap(handler, limited)

    def _enter(self, streaming: bool) -> None:
        self.in_flight += 1
        self.streams += streaming
        self._idle.clear()

    def _exit(self, streaming: bool) -> None:
        self.in_flight -= 1
        self.streams -= streaming
        if self.in_flight == 0:
            self._idle.set()


class Malformed:
    """A request message whose bytes did not parse (see ``MalformedInterceptor``)."""

    __slots__ = ("size", "error")

    def __init__(self, size: int, error: str) -> None:
        self.size, self.error = size, error

    def message(self, method: str) -> str:
        return (
            f"{method}: the request message ({self.size} bytes) is not a valid protobuf "
            f"message of this method's request type ({self.error}); expected the message "
            f"the service's .proto declares"
        )


class MalformedInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes that do not parse: INVALID_ARGUMENT (logged as one short line by
    ``MetricsInterceptor``), not gRPC's INTERNAL "Exception deserializing request!"
    with a traceback. In a stream, the item arrives as a ``Malformed`` and the servicer
    answers it in-band; the stream goes on (the v1 streams do; a stream whose servicer
    does not look, such as reflection, is exempt and keeps gRPC's behaviour)."""

    def __init__(self) -> None:
        self._handlers = PerMethod(self._tolerant)

    async def intercept_service(self, continuation: Continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT):
            return handler
        return self._handlers.get(details.method, handler)

    def _tolerant(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data) if parse is not None else data
            except Exception as exc:  # noqa: BLE001 - answered INVALID_ARGUMENT
                return Malformed(len(data), f"{type(exc).__name__}: {exc}")

        behavior = behavior_of(handler)
        if handler.request_streaming:
            return rewrap(handler, behavior, deserializer=tolerant)

        if handler.response_streaming:

            async def checked_stream(request: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
                if isinstance(request, Malformed):
                    set_error(context, grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
                    return
                async for response in behavior(request, context):
                    yield response

            return rewrap(handler, checked_stream, deserializer=tolerant)

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                set_error(context, grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
                return None
            return await behavior(request, context)

        return rewrap(handler, checked, deserializer=tolerant)
