"""One exception type for every failed call, and the one place RPC errors are translated.

Retries: only UNAVAILABLE (server starting, restarting, draining, unreachable) is
retried, with exponential backoff; every other status is raised at once. A message over
a gRPC message size limit (RESOURCE_EXHAUSTED, like a server that is full) is told apart
by :func:`message_too_large`, and its error says which limit and how to raise it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


# gRPC's own text when a message is over a max_{send,receive}_message_length: the side
# that refused it, and (message size vs. that side's limit) in bytes.
_TOO_LARGE = re.compile(
    r"(SERVER|CLIENT): (Received|Sent) message larger than max \((\d+) vs\. (\d+)\)"
)


@dataclass(frozen=True)
class MessageTooLarge:
    """A message over a gRPC message size limit: ``request`` (else the answer) of ``size``
    bytes, over the ``limit`` (bytes) of the ``server`` (else this client)."""

    request: bool
    server: bool
    size: int
    limit: int

    def reason(self, size: int | None = None) -> str:
        """Why it failed and the fix; ``size``: the one request's, if not the message's."""
        what = "the request" if self.request else "the answer"
        got = _mib(self.size if size is None else size)
        if self.server:
            fix = "raise the server's --max-message-mb"
            where = "the server's message limit"
        else:
            fix = "raise the client's max_message_mb"
            where = "this client's message limit"
        if self.request:
            fix += ", or send smaller or compressed images (e.g. JPEG)"
        else:
            fix += ", or send smaller images"
        return f"{what} is {got}, over {where} of {_mib(self.limit)}: {fix}"


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB ({size} bytes)"


def message_too_large(error: VisionServeError) -> MessageTooLarge | None:
    """The size limit ``error`` reports a message over, or None for any other error."""
    found = _TOO_LARGE.search(error.details)
    if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or found is None:
        return None
    side, verb, size, limit = found.groups()
    request = (side == "SERVER") == (verb == "Received")
    return MessageTooLarge(request, side == "SERVER", int(size), int(limit))


class VisionServeError(Exception):
    """A call failed. ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.request_id = ""  # set for in-band SegmentStream errors

    @property
    def retryable(self) -> bool:
        """True for UNAVAILABLE, the only status a client should retry."""
        return self.code == grpc.StatusCode.UNAVAILABLE

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> VisionServeError:
        """Translate a grpc (or grpc.aio) error; raise the result ``from error``."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    @classmethod
    def from_status(cls, code_value: int, details: str) -> VisionServeError:
        """From a numeric status code, as SegmentStream answers carry in-band."""
        code = next(
            (c for c in grpc.StatusCode if c.value[0] == code_value), grpc.StatusCode.UNKNOWN
        )
        return cls(code, details)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE: ``retries`` more attempts after the first,
    waiting ``initial_backoff`` seconds, times ``multiplier`` each time, at most ``max_backoff``."""

    retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError(
                f"backoff must satisfy 0 <= initial_backoff <= max_backoff, got "
                f"{self.initial_backoff} and {self.max_backoff}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def delays(self) -> Iterator[float]:
        """The waits before each retry (``retries`` of them)."""
        delay = self.initial_backoff
        for _ in range(self.retries):
            yield delay
            delay = min(delay * self.multiplier, self.max_backoff)


def translate(error: BaseException) -> VisionServeError:
    """Any failure of a call as a VisionServeError (RPC errors keep their status code)."""
    if isinstance(error, VisionServeError):
        return error
    if isinstance(error, grpc.RpcError):
        translated = VisionServeError.from_rpc_error(error)
        too_large = message_too_large(translated)
        if too_large is not None:
            details = f"{too_large.reason()} ({translated.details})"
            return VisionServeError(translated.code, details)
        return translated
    return VisionServeError(grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}")


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy, what: str = "call") -> T:
    """Run ``fn``; retry on UNAVAILABLE per ``policy``; raise VisionServeError otherwise."""
    delays = policy.delays()
    while True:
        try:
            return fn()
        except grpc.RpcError as rpc_error:
            error = translate(rpc_error)
            delay = next(delays, None) if error.retryable else None
            if delay is None:
                raise error from rpc_error
        log.info("%s: UNAVAILABLE, retrying in %.2fs: %s", what, delay, error.details)
        time.sleep(delay)


async def acall_with_retry(
    fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str = "call"
) -> T:
    """The asyncio twin of :func:`call_with_retry`."""
    delays = policy.delays()
    while True:
        try:
            return await fn()
        except grpc.RpcError as rpc_error:
            error = translate(rpc_error)
            delay = next(delays, None) if error.retryable else None
            if delay is None:
                raise error from rpc_error
        log.info("%s: UNAVAILABLE, retrying in %.2fs: %s", what, delay, error.details)
        await asyncio.sleep(delay)
