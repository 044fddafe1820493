"""Request messages built from paths, bytes or arrays (shared by both clients)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionserve.protos import visionserve_pb2 as pb

ImageInput = str | Path | bytes | np.ndarray
MaskInput = str | Path | bytes | np.ndarray
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_message(image: ImageInput) -> pb.Image:
    """A path or encoded bytes travel as they are; an array travels raw (uint8 HWC, RGB)."""
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"image arrays must be uint8 HxW or HxWxC, got {array.dtype} {array.shape}"
        )
    channels = 1 if array.ndim == 2 else array.shape[2]
    raw = pb.RawImage(
        data=array.tobytes(), height=array.shape[0], width=array.shape[1], channels=channels
    )
    return pb.Image(raw=raw)


def mask_message(mask: MaskInput) -> pb.Mask:
    """Ground truth: a PNG file or bytes, or a uint8 HxW array of class indices."""
    if isinstance(mask, (str, Path)):
        mask = Path(mask).read_bytes()
    if isinstance(mask, bytes):
        if not mask.startswith(PNG_SIGNATURE):
            raise ValueError(
                "ground-truth masks must be PNG files (8-bit, one channel) or uint8 arrays"
            )
        return pb.Mask(data=mask, format=pb.MASK_FORMAT_PNG)
    array = np.ascontiguousarray(mask)
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"ground-truth arrays must be uint8 HxW, got {array.dtype} {array.shape}")
    h, w = array.shape
    return pb.Mask(data=array.tobytes(), height=h, width=w, format=pb.MASK_FORMAT_RAW)


def segment_request(
    image: ImageInput,
    *,
    model: str,
    version: str = "",
    ground_truth: MaskInput | None = None,
    ignore_index: int | None = None,
    request_id: str = "",
    raw_mask: bool = False,
) -> pb.SegmentRequest:
    """One SegmentRequest; ``raw_mask`` asks for the mask as raw uint8 instead of PNG."""
    request = pb.SegmentRequest(
        model=model,
        version=version,
        image=image_message(image),
        request_id=request_id,
        mask_format=pb.MASK_FORMAT_RAW if raw_mask else pb.MASK_FORMAT_PNG,
    )
    if ground_truth is not None:
        request.ground_truth.CopyFrom(mask_message(ground_truth))
    if ignore_index is not None:
        if not 0 <= ignore_index <= 255:
            raise ValueError(
                f"ignore_index must be in 0..255 (masks are uint8), got {ignore_index}"
            )
        request.ignore_index = ignore_index
    return request


def classify_request(
    image: ImageInput, *, model: str, version: str = "", top_k: int = 0, request_id: str = ""
) -> pb.ClassifyRequest:
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = the server's default), got {top_k}")
    return pb.ClassifyRequest(
        model=model, version=version, image=image_message(image), top_k=top_k, request_id=request_id
    )
