"""What a batch run is told and the policy it follows: ``BatchSettings`` (what to ask the
server and how hard to push it), ``Prepared`` (a job read and ready to send), and the
retry, backoff and deadline rules of ``_batch.BatchRunner``, each named once here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from visionserve.clients._results import Job
from visionserve.protos import visionserve_pb2 as pb


@dataclass(frozen=True)
class BatchSettings:
    """What to ask the server and how hard to push it."""

    model: str
    version: str
    num_classes: int
    ignore_index: int
    send_ignore_index: bool = False
    server_iou: bool = False
    streams: int = 4
    window: int = 16
    per_message: int = 8
    timeout: float = 60.0
    give_up_after: float = 60.0
    threads: int = 2
    out_root: Path = Path(".")

    def __post_init__(self) -> None:
        for name in ("streams", "window", "per_message", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.timeout <= 0 or self.give_up_after <= 0:
            raise ValueError(
                f"timeout and give_up_after must be > 0 s, got {self.timeout}, {self.give_up_after}"
            )


@dataclass(frozen=True)
class Prepared:
    """A job with its request built (file bytes read) and its ground truth decoded."""

    job: Job
    request: pb.SegmentRequest
    truth: np.ndarray | None


# Each stream carries a deadline (servers may not cope with none); a stream that reaches
# it is simply reopened, its unanswered requests sent again. Per-request deadlines are
# the client's watchdog (``BatchSettings.timeout``).
STREAM_DEADLINE_S = 3600.0
WATCH_S = 0.25  # how often a stream's watchdog looks for a request past its deadline

# Stream-level failures after which the stream is reopened and its unanswered requests
# sent again: UNAVAILABLE (server restarting, draining, unreachable) and a client-side
# deadline; also the codes a connection lost mid-message surfaces as (INTERNAL "Internal
# error from Core", UNKNOWN "Stream removed", CANCELLED), but those at most
# MAX_ODD_FAILURES times in a row without an answer, so a real server bug stops the run.
# RESOURCE_EXHAUSTED (too many streams open on the server) retires the stream's worker
# while another runs; the last one reopens with backoff.
SERVER_GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CONNECTION_LOST = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
SERVER_FULL = grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_ODD_FAILURES = 3
# grpc.aio reports a call that the server ended while a write was under way as INTERNAL
# "Internal error from Core", losing the server's status (grpc/grpc#36066): a stream
# refused at once (--max-streams, draining) looks like that about one time in two. Such
# a failure is no odd failure and not the "last error": the stream is reopened with
# backoff, and the next refusal usually comes through with its own code.
BACKOFF_S = (0.1, 2.0)  # first and longest wait before a stream is reopened
# A request answered RESOURCE_EXHAUSTED in-band (a full queue, or an image over a server
# limit: the code does not say which) is sent again after REFUSED_BACKOFF_S, doubling, at
# most MAX_REFUSALS times; then it fails with the server's message.
MAX_REFUSALS = 3
REFUSED_BACKOFF_S = 0.25
# Files read per worker-thread hop: each hop costs two event-loop wake-ups.
PREPARE_CHUNK = 8


class BatchStopped(Exception):
    """The run stopped before every image was tried (the server is gone, or refused us)."""
