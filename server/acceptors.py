"""More than one call taken from gRPC core at a time, per method, on a grpc.aio server.

grpc.aio's serving task keeps ONE ``request_call`` outstanding per registered method: the
next call of that method is taken from core only after the event loop has handled the
previous one's arrival and asked again (three or four loop iterations). When the loop is
busy (a flood of small requests on 2 cores), that hand-over, not the handlers, limits how
many calls per second reach the servicers; the rest wait in core, invisible to admission
control, until their deadline passes (DEADLINE_EXCEEDED instead of RESOURCE_EXHAUSTED).

``Acceptors`` keeps ``extra`` more requests outstanding per registered unary method
(streams keep grpc.aio's one: a stream is long-lived, and 1,000 of them taken at once
made the loop's iterations, and so health checks, slower), each a
small task doing what grpc.aio's own loop does for one call: take it, hand it to
``_handle_rpc`` with the server's interceptors, keep the task referenced. It relies on
grpc.aio's Cython internals (``AioServer._request_registered_call``, ``_handle_rpc``,
``_schedule_rpc_coro``, ``_MethodResolver``), checked at import against grpcio 1.85's
parameters; where they are missing or differ it does nothing and says so once (the server
then works as stock grpc.aio does). Methods added only as generic handlers (reflection)
keep grpc.aio's one call at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc

log = logging.getLogger(__name__)

# What this module calls, with the parameters it passes (grpcio 1.85's); any other
# shape turns the extra acceptors off rather than orphaning a call taken from core.
_SIGNATURES = {
    "_handle_rpc": (
        "method_name", "method_resolver", "interceptors", "rpc_state", "loop",
        "concurrency_exceeded",
    ),
    "_schedule_rpc_coro": ("rpc_coro", "rpc_state", "loop", "method_name"),
}  # fmt: skip


def _internals() -> Any:
    """grpc.aio's Cython module when it has what ``Acceptors`` uses, else None."""
    try:
        from grpc._cython import cygrpc
    except ImportError:  # pragma: no cover
        return None
    for name, params in _SIGNATURES.items():
        code = getattr(getattr(cygrpc, name, None), "__code__", None)
        if code is None or code.co_varnames[: code.co_argcount] != params:
            return None
    needed = (cygrpc, "_MethodResolver"), (cygrpc, "_RequestCallError")
    if not all(hasattr(owner, name) for owner, name in needed):
        return None
    return cygrpc if hasattr(cygrpc.AioServer, "_request_registered_call") else None


_INTERNALS = _internals()


class Acceptors:
    """Records the handlers added to ``server`` (call ``record`` before adding services),
    then, once the server started, keeps ``extra`` more calls requested per registered
    unary method (``start``) until the server stops."""

    def __init__(
        self,
        server: grpc.aio.Server,
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        extra: int,
    ) -> None:
        self._server = server
        self._interceptors = tuple(interceptors)
        self.extra = extra if _INTERNALS is not None else 0
        self._generic: list[Any] = []
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self._tasks: set[asyncio.Task] = set()
        self.taken = 0  # calls these acceptors took (grpc.aio's own loop takes the rest)
        self._loops: list[asyncio.Task] = []
        if extra and _INTERNALS is None:
            log.warning(
                "--accept-ahead is off: this grpcio's aio internals differ from grpcio "
                "1.85's; calls are taken from gRPC core one per method at a time"
            )

    def record(self) -> None:
        """Wrap the server's ``add_*`` methods to remember what they add (not when off)."""
        if not self.extra:
            return
        add_generic = self._server.add_generic_rpc_handlers
        add_registered = self._server.add_registered_method_handlers

        def generic(handlers: Sequence[Any]) -> None:
            self._generic.extend(handlers)
            add_generic(handlers)

        def registered(service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            self._registered.update({f"/{service}/{m}": h for m, h in handlers.items()})
            add_registered(service, handlers)

        self._server.add_generic_rpc_handlers = generic  # type: ignore[method-assign]
        self._server.add_registered_method_handlers = registered  # type: ignore[method-assign]

    def start(self) -> None:
        """After ``server.start()``, on its loop."""
        if not self.extra or not self._registered:
            return
        aio = self._server._server  # the Cython AioServer
        resolver = _INTERNALS._MethodResolver(self._generic, self._registered)
        for method, handler in self._registered.items():
            if handler.request_streaming or handler.response_streaming:
                continue  # streams are long-lived: taking them faster floods the loop
            for _ in range(self.extra):
                self._loops.append(asyncio.ensure_future(self._accept(aio, resolver, method)))

    async def _accept(self, aio: Any, resolver: Any, method: str) -> None:
        loop, method_bytes = asyncio.get_running_loop(), method.encode()
        while aio.is_running():
            try:
                rpc_state = await aio._request_registered_call(method_bytes)
            except _INTERNALS._RequestCallError:
                continue  # core failed this request (shutting down: the loop test ends it)
            self.taken += 1
            coro = _INTERNALS._handle_rpc(
                method, resolver, self._interceptors, rpc_state, loop, False
            )
            task = loop.create_task(_INTERNALS._schedule_rpc_coro(coro, rpc_state, loop, method))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Once the server stopped: end the accepting tasks."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
