"""Logs under overload: one line per failure class (method, status) per interval, and
grpc's own per-call ERROR records (a reply to a call whose client already gave up, one per
request) one per message per interval, each next line with the count it stood for."""

from __future__ import annotations

import logging
import time

from visionserve.server.logs import GRPC_CORE_LOGGER, FailureLog, RepeatFilter


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logger(name: str, interval_s: float = 0.0) -> tuple[logging.Logger, Collect]:
    """A logger writing to a list; with a ``RepeatFilter`` of ``interval_s`` when given."""
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers.clear()
    logger.filters.clear()
    collect = Collect()
    logger.addHandler(collect)
    if interval_s:
        logger.addFilter(RepeatFilter(interval_s))
    return logger, collect


def test_repeats_within_the_interval_are_counted_not_written() -> None:
    logger, collect = _logger("test.repeats", interval_s=0.2)
    for _ in range(50):
        logger.error("ExecuteBatchError raised in core by servicer method [%s]", "/a/B")
    logger.error("another message [%s]", "/a/B")
    assert collect.lines == [
        "ExecuteBatchError raised in core by servicer method [/a/B]",
        "another message [/a/B]",
    ]
    time.sleep(0.25)
    logger.error("ExecuteBatchError raised in core by servicer method [%s]", "/a/C")
    assert collect.lines[-1] == (
        "ExecuteBatchError raised in core by servicer method [/a/C] "
        "(49 more like it in the previous 0.2 s)"
    )


def test_failures_are_logged_once_per_class_per_interval() -> None:
    logger, collect = _logger("test.failures")
    logger.setLevel(logging.INFO)
    failures = FailureLog(logger, interval_s=0.2)
    for _ in range(30):
        failures.failed("/a/B", "RESOURCE_EXHAUSTED", 0.0015)
    failures.failed("/a/B", "DEADLINE_EXCEEDED", 2.0)
    assert collect.lines == [
        "rpc /a/B failed: RESOURCE_EXHAUSTED after 1.5 ms",
        "rpc /a/B failed: DEADLINE_EXCEEDED after 2000.0 ms",
    ]
    time.sleep(0.25)
    failures.failed("/a/B", "RESOURCE_EXHAUSTED", 0.003)
    assert collect.lines[-1] == (
        "rpc /a/B failed: RESOURCE_EXHAUSTED after 3.0 ms (29 more like it in the previous 0.2 s)"
    )


def test_the_server_quiets_grpcs_logger_once(start_server) -> None:
    start_server()
    start_server()
    filters = logging.getLogger(GRPC_CORE_LOGGER).filters
    assert sum(isinstance(f, RepeatFilter) for f in filters) == 1
