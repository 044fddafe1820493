"""The batch segmentation report, rebuilt from journal records: JSON, CSV and HTML.

Dataset-level IoU sums the client-side confusion matrices, so IoU per class is
sum(intersection) / sum(union), and mean IoU skips classes absent everywhere. With
``--server-iou`` each image's matrix was also checked equal to the server's per-image
intersection/union counts; the report says so only for the images where it was.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from visionserve.clients._dataset_iou import DatasetIoU, iou_from_confusion
from visionserve.server.atomic import write_atomic

WORST_IMAGES = 8
HISTOGRAM_BINS = 10


def dataset_iou(
    labels: list[str], records: Iterable[dict[str, Any]]
) -> tuple[DatasetIoU, np.ndarray]:
    """Totals and the summed confusion matrix (rows true, columns predicted) of scored records."""
    n = len(labels)
    confusion = np.zeros((n, n), np.int64)
    totals = DatasetIoU(list(labels))
    for record in records:
        if record.get("confusion") is None:
            continue
        confusion += np.asarray(record["confusion"], np.int64)
        miou = record.get("miou")
        totals.per_image_miou.append(math.nan if miou is None else float(miou))
    totals.intersection, totals.union, _ = iou_from_confusion(confusion)
    totals.correct_pixels = int(np.trace(confusion))
    totals.scored_pixels = int(confusion.sum())
    return totals, confusion


def miou_distribution(values: list[float]) -> dict[str, Any]:
    """Summary and histogram (10 bins over [0, 1]) of per-image mean IoU, NaNs left out."""
    valid = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    counts, edges = np.histogram(valid, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    summary: dict[str, Any] = {
        "count": int(valid.size),
        "histogram": {"edges": [round(e, 3) for e in edges.tolist()], "counts": counts.tolist()},
    }
    if valid.size:
        q = np.quantile(valid, [0.0, 0.1, 0.5, 0.9, 1.0])
        summary.update(
            mean=round(float(valid.mean()), 6),
            min=round(float(q[0]), 6),
            p10=round(float(q[1]), 6),
            median=round(float(q[2]), 6),
            p90=round(float(q[3]), 6),
            max=round(float(q[4]), 6),
        )
    return summary


def build_report(
    *,
    model: str,
    version: str,
    labels: list[str],
    keys: list[str],
    records: dict[str, dict[str, Any]],
    failures: dict[str, str],
    stopped: str | None = None,
) -> dict[str, Any]:
    """The report of the images ``keys`` (this run's input) from their journal records."""
    done = [records[k] for k in keys if k in records]
    report: dict[str, Any] = {
        "model": model,
        "version": version,
        "images": len(keys),
        "segmented": len(done),
        "failed": len(failures),
        "not_done": len(keys) - len(done) - len(failures),
        "stopped": stopped,
        "failures": [{"image": k, "reason": failures[k]} for k in sorted(failures)],
        "served": served_summary(done),
    }
    scored = [r for r in done if r.get("confusion") is not None]
    if scored:
        totals, confusion = dataset_iou(labels, scored)
        iou = totals.to_dict()
        iou["per_image_mean_iou"] = miou_distribution(totals.per_image_miou)
        iou["confusion_matrix"] = {
            "rows": "true class",
            "columns": "predicted class",
            "labels": list(labels),
            "counts": confusion.tolist(),
        }
        checked = sum(1 for r in scored if r.get("server_checked"))
        iou["server_crosscheck"] = (
            f"per image, the server's intersection/union equal the client's confusion "
            f"matrix ({checked} of {len(scored)} images, sent with --server-iou)"
            if checked
            else None
        )
        ranked = sorted(scored, key=lambda r: math.inf if r.get("miou") is None else r["miou"])
        iou["worst_images"] = [
            {"image": r["key"], "mean_iou": r.get("miou")} for r in ranked[:WORST_IMAGES]
        ]
        report["iou"] = iou
    return report


def served_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How the images were served: counts per mode ("bucket", "tiled", "scaled", ...), the
    largest image, and the images the server scaled down (their masks are not at full
    resolution)."""
    modes: dict[str, int] = {}
    for record in records:
        mode = str(record.get("served", "unknown")).split(":")[0].split(" ")[0]
        modes[mode] = modes.get(mode, 0) + 1
    largest = max(records, key=lambda r: r.get("height", 0) * r.get("width", 0), default=None)
    return {
        "modes": modes,
        "largest_image": None if largest is None else [largest.get("height"), largest.get("width")],
        "scaled_images": sorted(r["key"] for r in records if r.get("scaled")),
    }


def classes_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "label", "iou", "intersection", "union"])
    for c in report.get("iou", {}).get("classes", []):
        writer.writerow(
            [
                c["index"],
                c["label"],
                "" if c["iou"] is None else c["iou"],
                c["intersection"],
                c["union"],
            ]
        )
    return buffer.getvalue()


def confusion_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    matrix = report.get("iou", {}).get("confusion_matrix")
    if matrix:
        writer.writerow(["true \\ predicted", *matrix["labels"]])
        for label, row in zip(matrix["labels"], matrix["counts"], strict=True):
            writer.writerow([label, *row])
    return buffer.getvalue()


def images_csv(
    keys: list[str], records: dict[str, dict[str, Any]], failures: dict[str, str]
) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["image", "status", "mask", "height", "width", "served", "mean_iou", "pixel_accuracy", "reason"]
    )
    for key in keys:
        record = records.get(key)
        if record is not None:
            acc = record["correct"] / record["scored"] if record.get("scored") else ""
            miou = record.get("miou")
            writer.writerow(
                [
                    key,
                    "ok",
                    record["mask"],
                    record.get("height", ""),
                    record.get("width", ""),
                    record.get("served", ""),
                    "" if miou is None else round(miou, 6),
                    "" if acc == "" else round(acc, 6),
                    "",
                ]
            )
        else:
            status = "failed" if key in failures else "not done"
            writer.writerow([key, status, "", "", "", "", "", "", failures.get(key, "")])
    return buffer.getvalue()


def write_report(
    out: Path,
    report: dict[str, Any],
    keys: list[str],
    records: dict[str, dict[str, Any]],
    failures: dict[str, str],
    html: str,
) -> list[Path]:
    """report.json, report_classes.csv, report_confusion.csv, report_images.csv, report.html."""
    files = {
        "report.json": json.dumps(report, indent=2, allow_nan=False),
        "report_classes.csv": classes_csv(report),
        "report_confusion.csv": confusion_csv(report),
        "report_images.csv": images_csv(keys, records, failures),
        "report.html": html,
    }
    for name, text in files.items():
        write_atomic(out / name, text.encode("utf-8"))
    return [out / name for name in files]
