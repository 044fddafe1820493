"""grpc's own per-call ERROR records (a reply to a call whose client already gave up,
one per request under overload) are cut to one per message per interval, with a count."""

from __future__ import annotations

import logging
import time

from visionserve.server.logs import GRPC_CORE_LOGGER, RepeatFilter


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logger(name: str, interval_s: float) -> tuple[logging.Logger, Collect]:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers.clear()
    logger.filters.clear()
    collect = Collect()
    logger.addHandler(collect)
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


def test_the_server_quiets_grpcs_logger_once(start_server) -> None:
    start_server()
    start_server()
    filters = logging.getLogger(GRPC_CORE_LOGGER).filters
    assert sum(isinstance(f, RepeatFilter) for f in filters) == 1
