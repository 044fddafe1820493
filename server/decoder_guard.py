"""OpenCV's own bound on decoded images: no decoder allocates past the server's pixel limit.

Every OpenCV decoder (PNG, JPEG, TIFF, WebP, GIF, JPEG 2000, AVIF, PNM, HDR, Sun raster,
...) reads its header, then OpenCV compares height*width with ``OPENCV_IO_MAX_IMAGE_PIXELS``
and raises before it allocates the image. OpenCV reads that variable ONCE, when ``cv2`` is
first imported (a static initialiser of imgcodecs); setting it afterwards changes nothing.

So the bound is set in one place, :func:`limit_decoders`, from the server's
``max_decoded_pixels``, by ``visionserve serve`` before anything imports ``cv2`` (the
settings module therefore must not import ``cv2``, even indirectly: a test checks); and
:func:`check_decoders` (called when a server is created) asks OpenCV which bound is in
force and says so when it is not the server's limit (``cv2`` imported earlier by a program
that embeds the server: the formats :mod:`codec` has no header check for are then checked
only after decoding). This module imports ``cv2`` only inside :func:`check_decoders`.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_VAR = "OPENCV_IO_MAX_IMAGE_PIXELS"
_MAX_SIDE = 1 << 20  # OpenCV's default OPENCV_IO_MAX_IMAGE_WIDTH / _HEIGHT

log = logging.getLogger(__name__)


def limit_decoders(max_pixels: int) -> bool:
    """Set OpenCV's decoder bound to ``max_pixels``; False when too late (cv2 imported)."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    if "cv2" in sys.modules:
        return False
    os.environ[ENV_VAR] = str(max_pixels)
    return True


def _refused(pixels: int, *, at_most: bool) -> bool:
    """Whether OpenCV's bound refuses an image of about ``pixels`` pixels (``at_most``:
    rounded down, else up, to whole rows of up to 2**20), asked with a PGM header alone
    (no pixel data: past the bound check, the decoder stops at once)."""
    import cv2
    import numpy as np

    width = min(pixels, _MAX_SIDE)
    height = pixels // width if at_most else -(-pixels // width)
    header = np.frombuffer(f"P5\n{width} {height}\n255\n".encode(), dtype=np.uint8)
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # "can't read data"
    try:
        cv2.imdecode(header, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        return "MAX_IMAGE" in str(exc)
    finally:
        cv2.utils.logging.setLogLevel(level)
    return False


def check_decoders(max_pixels: int) -> bool:
    """Whether OpenCV's bound in force is ``max_pixels`` (logs a warning when it is not)."""
    too_high = not _refused(max_pixels + 1, at_most=False)
    too_low = _refused(max_pixels, at_most=True)
    if too_high:
        log.warning(
            "OpenCV's decoder bound (%s) is above the server's pixel limit %d: images in "
            "formats without a header check here (PNM, HDR, JPEG 2000, AVIF, ...) are checked "
            "only after decoding. Set %s=%d before cv2 is imported (visionserve serve does).",
            os.environ.get(ENV_VAR, "OpenCV's default"), max_pixels, ENV_VAR, max_pixels,
        )
    elif too_low:
        log.warning(
            "OpenCV's decoder bound (%s) is below the server's pixel limit %d: larger images "
            "are refused. Set %s=%d before cv2 is imported (visionserve serve does).",
            os.environ.get(ENV_VAR), max_pixels, ENV_VAR, max_pixels,
        )
    return not (too_high or too_low)
