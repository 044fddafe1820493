"""One exception type for every failed call, and the one place RPC errors are translated.

Retries: only UNAVAILABLE (server starting, restarting, draining, unreachable) is
retried, with exponential backoff; every other status is raised at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        return VisionServeError.from_rpc_error(error)
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
