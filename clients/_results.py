"""One segmented image -> its journal record and its files: what every batch path
(through a server, in-process, in Ray Data actors) does with a mask, in one place, so
their masks, journals and reports are the same."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionserve.clients._dataset_iou import confusion_matrix, iou_from_confusion, nan_mean
from visionserve.clients._render import decode_rgb, encode_png, overlay, overlay_size
from visionserve.clients._types import decode_mask
from visionserve.protos import visionserve_pb2 as pb
from visionserve.server.atomic import write_atomic


@dataclass(frozen=True)
class Job:
    """One image to segment; ``key`` is its path relative to the input root."""

    key: str
    image: Path
    gt: Path | None
    mask_out: Path
    overlay_out: Path | None = None


def build_record(
    job: Job, mask: np.ndarray, truth: np.ndarray | None, num_classes: int, ignore_index: int
) -> dict[str, Any]:
    """The journal record of ``job`` (without its files' entries): size, and with ground
    truth the confusion matrix, per-image mean IoU and pixel counts."""
    record: dict[str, Any] = {
        "key": job.key,
        "image": str(job.image),
        "gt": None if job.gt is None else str(job.gt),
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
    }
    if truth is not None:
        confusion = confusion_matrix(mask, truth, num_classes, ignore_index)
        miou = nan_mean(iou_from_confusion(confusion)[2])
        record.update(
            confusion=confusion.tolist(),
            miou=None if np.isnan(miou) else miou,
            scored=int(confusion.sum()),
            correct=int(np.trace(confusion)),
        )
    return record


def served_fields(mode: str, description: str, scale: float) -> dict[str, Any]:
    """A record's ``served`` (how the server served the image, one line) and ``scaled``
    (whether the model ran on a scaled-down copy)."""
    return {
        "served": description or mode,
        "scaled": mode == "scaled" or (mode == "resized" and scale < 1.0),
    }


def served_record(
    job: Job,
    truth: np.ndarray | None,
    response: pb.SegmentResponse,
    num_classes: int,
    ignore_index: int,
    server_iou: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A server's answer -> (the mask, its record): how it was served, and with
    ``server_iou`` the server's IoU counts checked against the record's."""
    mask = decode_mask(response.mask)
    record = build_record(job, mask, truth, num_classes, ignore_index)
    if response.HasField("serving"):  # how the server served it (older servers: absent)
        served = response.serving
        record.update(served_fields(served.mode, served.description, served.scale))
    if server_iou and truth is not None:
        check_server_iou(record["confusion"], response)
        record["server_checked"] = True  # the report claims the cross-check for these
    return mask, record


def check_server_iou(confusion: list[list[int]], response: pb.SegmentResponse) -> None:
    """The server's per-class counts must be those of the returned mask's confusion matrix."""
    intersection, union, _ = iou_from_confusion(np.asarray(confusion))
    server_i = [int(c.intersection) for c in response.iou.classes]
    server_u = [int(c.union) for c in response.iou.classes]
    if server_i != intersection.tolist() or server_u != union.tolist():
        raise ValueError(
            f"the server's IoU counts (intersection {server_i}, union {server_u}) disagree with "
            f"the confusion matrix of the returned mask (intersection {intersection.tolist()}, "
            f"union {union.tolist()})"
        )


def write_outputs(
    job: Job, mask: np.ndarray, record: dict[str, Any], out_root: Path, image: bytes
) -> dict[str, Any]:
    """Write the mask PNG (and the overlay of the encoded ``image``) atomically; adds
    their paths and the mask's size in bytes to ``record`` (for the journal) and returns it."""
    png = encode_png(mask)
    write_atomic(job.mask_out, png)
    record["mask"] = job.mask_out.relative_to(out_root).as_posix()
    record["bytes"] = len(png)
    if job.overlay_out is not None:  # may be downscaled (large images); masks never are
        blended = overlay(*overlay_size(decode_rgb(image), mask))
        write_atomic(job.overlay_out, encode_png(blended, rgb=True))
        record["overlay"] = job.overlay_out.relative_to(out_root).as_posix()
    return record
