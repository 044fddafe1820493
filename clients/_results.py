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
