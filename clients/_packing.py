"""How many requests one stream message of the batch client carries: up to
``per_message``, fewer once a server's answer to several was over its message size limit,
and at most the bytes of the lowest request size limit learnt (gRPC's "message larger
than max" errors, :func:`visionserve.clients._errors.message_too_large`)."""

from __future__ import annotations

import logging

import grpc

from visionserve.clients._errors import MessageTooLarge, VisionServeError
from visionserve.protos import visionserve_pb2 as pb

log = logging.getLogger(__name__)


def message_size(request: pb.SegmentRequest, batched: bool) -> int:
    """Bytes ``request`` adds to a message: the request, plus (in a SegmentBatch) its
    field tag and length prefix; alone, the whole message either way."""
    size = request.ByteSize()
    return size + 1 + max(1, (size.bit_length() + 6) // 7) if batched else size


class Packing:
    """What later messages may carry, learnt from the messages the server refused."""

    def __init__(self, per_message: int) -> None:
        self.per_message = per_message
        self.too_large: MessageTooLarge | None = None  # the lowest request limit learnt

    @property
    def limit(self) -> int | None:
        """The largest message, in bytes, a server or this client takes (None: unknown)."""
        return self.too_large.limit if self.too_large else None

    def learn(self, too_large: MessageTooLarge, known: int | None, error: object) -> bool:
        """A request was over ``too_large.limit``; ``known``: the limit in force when it
        was sent. False when that limit was already heeded (the sizes are misjudged)."""
        if known is not None and too_large.limit >= known:
            return False
        if self.limit is None or too_large.limit < self.limit:
            log.info("messages packed up to %d bytes from now on: %s", too_large.limit, error)
            self.too_large = too_large
        return True

    def fewer(self, together: int, too_large: MessageTooLarge, error: object) -> None:
        """The answer to ``together`` requests was over the limit: about as many as fit,
        if their answers are alike (fewer each time it happens again; at least one)."""
        fit = together * too_large.limit // too_large.size
        if fit < self.per_message:
            self.per_message = max(1, fit)
            log.info("%d request(s) per message from now on: %s", self.per_message, error)

    def over(self, request: pb.SegmentRequest, batched: bool) -> VisionServeError | None:
        """Why ``request`` alone is over the limit learnt (None: it fits, or none is known)."""
        size = message_size(request, batched)
        if self.too_large is None or size <= self.too_large.limit:
            return None
        return VisionServeError(grpc.StatusCode.RESOURCE_EXHAUSTED, self.too_large.reason(size))

    def fits(self, size: int, request: pb.SegmentRequest) -> bool:
        """Whether ``request`` fits a SegmentBatch of ``size`` bytes so far."""
        return self.limit is None or size + message_size(request, True) <= self.limit
