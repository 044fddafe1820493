"""Errors the serving path raises, each carrying the gRPC status it maps to.

Pure Python (no grpc import), so pure-numpy modules such as ``iou`` can raise them.
The servicer makes them the call's status: ``grpc.StatusCode[err.status]``, ``str(err)``.
"""

from __future__ import annotations


class VisionServeError(Exception):
    """Base class; ``status`` is the name of a ``grpc.StatusCode`` member."""

    status = "INTERNAL"


class InvalidArgument(VisionServeError, ValueError):
    """The request is malformed: undecodable image, bad shape, labels out of range..."""

    status = "INVALID_ARGUMENT"


class NotFound(VisionServeError, LookupError):
    """Unknown model or version."""

    status = "NOT_FOUND"


class ResourceExhausted(VisionServeError):
    """A limit was exceeded: decoded pixels, message size, a full request queue."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(VisionServeError):
    """The server is not ready (still loading) or is shutting down."""

    status = "UNAVAILABLE"


class BackendError(VisionServeError):
    """Inference failed inside a backend, or the model returned something unexpected."""

    status = "INTERNAL"


class DeadlineExceeded(VisionServeError):
    """The request's deadline passed before it could run (it never reached the backend)."""

    status = "DEADLINE_EXCEEDED"
