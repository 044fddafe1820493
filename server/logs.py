"""Structured logs: one JSON object per line (``--log-format json``).

Fields: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, the exception
text when there is one, and every ``extra={...}`` field the call passed (for example
the interceptor's ``method``, ``code`` and ``duration_ms``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``logging.Formatter`` writing one JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_json_logs(logger: logging.Logger | None = None) -> None:
    """Switch every handler of ``logger`` (default: the root logger) to JSON lines."""
    logger = logger or logging.getLogger()
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


class Throttle:
    """One event per key per ``interval_s``: ``allow(key)`` is None for an event to drop,
    else how many of that key were dropped since the last one allowed (thread-safe)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._keys: dict[object, list[float]] = {}  # [since, count dropped]

    def allow(self, key: object) -> int | None:
        now = time.monotonic()
        with self._lock:
            state = self._keys.get(key)
            if state is not None and now - state[0] < self.interval_s:
                state[1] += 1
                return None
            self._keys[key] = [now, 0]
        return int(state[1]) if state is not None else 0

    def more(self, dropped: int) -> str:
        """The suffix saying how many an allowed event stood for ("" when none)."""
        return f" ({dropped} more like it in the previous {self.interval_s:g} s)" if dropped else ""


class FailureLog:
    """One log line per failure class (method, status) per ``interval_s``, not one per
    request: under overload a flood of RESOURCE_EXHAUSTED answers writes one line per
    interval, saying how many more of that class it stood for.

    Durations logged are the whole call as the server saw it (queue time included).
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._throttle = Throttle(interval_s)

    def failed(self, method: str, code: str, seconds: float) -> None:
        dropped = self._throttle.allow((method, code))
        if dropped is None:
            return
        self._log.info(
            "rpc %s failed: %s after %.1f ms%s",
            method,
            code,
            seconds * 1e3,
            self._throttle.more(dropped),
            extra={"method": method, "code": code, "duration_ms": round(seconds * 1e3, 3)},
        )


GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


class RepeatFilter(logging.Filter):
    """One record per (logger, message template) per ``interval_s``; the next one let
    through says how many it stood for.

    Installed on grpc's own logger (``quiet_grpc_repeats``): under overload grpc logs an
    ERROR with its exception for every reply to a call whose client already gave up
    ("ExecuteBatchError raised in core by servicer method [...]"), one per request.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self._throttle = Throttle(interval_s)

    def filter(self, record: logging.LogRecord) -> bool:
        dropped = self._throttle.allow((record.name, str(record.msg)))
        if dropped is None:
            return False
        record.msg = f"{record.msg}{self._throttle.more(dropped)}"
        return True


def quiet_grpc_repeats(interval_s: float = 10.0) -> None:
    """Add a ``RepeatFilter`` to grpc's core logger, once per process."""
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter(interval_s))
