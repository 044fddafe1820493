"""The batch report as one self-contained HTML page: hand-written inline SVG plots and
base64 PNG thumbnails, no scripts, no external resources (it opens offline)."""

from __future__ import annotations

import base64
import logging
from html import escape
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from visionserve.clients._render import PALETTE, encode_png, overlay, thumbnail

log = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f4f4f4} .num{text-align:right} .bad{color:#b00}
figure{display:inline-block;margin:6px;text-align:center;font-size:12px} img{border:1px solid #ccc}
"""


def render_html(report: dict[str, Any], records: dict[str, dict[str, Any]], out_root: Path) -> str:
    """The whole page for ``report`` (see ``build_report``)."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>visionserve segment: "
        f"{escape(report['model'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Segmentation report: {escape(report['model'])} v{escape(report['version'])}</h1>",
        _summary(report),
    ]
    iou = report.get("iou")
    if iou:
        classes = iou["classes"]
        parts += [
            "<h2>Per-class IoU (dataset level: summed intersections / summed unions)</h2>",
            _bars_svg(classes),
            _class_table(classes),
            "<h2>Confusion matrix (rows: true class, columns: predicted; colour: row share)</h2>",
            _heatmap_svg(iou["confusion_matrix"]),
            "<h2>Per-image mean IoU</h2>",
            _histogram_svg(iou["per_image_mean_iou"]),
            "<h2>Worst images (image | prediction overlay | ground-truth overlay)</h2>",
            _worst(iou["worst_images"], records, out_root),
        ]
    if report["failures"]:
        rows = "".join(
            f"<tr><td>{escape(f['image'])}</td><td class='bad'>{escape(f['reason'])}</td></tr>"
            for f in report["failures"]
        )
        parts.append(
            f"<h2>Failures ({len(report['failures'])})</h2>"
            f"<table><tr><th>image</th><th>reason</th></tr>{rows}</table>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "absent" if value is None else f"{value:.{digits}f}"


def _summary(report: dict[str, Any]) -> str:
    rows = [
        ("images", report["images"]),
        ("segmented", report["segmented"]),
        ("failed", report["failed"]),
        ("not done", report["not_done"]),
    ]
    iou = report.get("iou")
    if iou:
        rows += [
            ("mean IoU (dataset, NaN-skipping)", _fmt(iou["mean_iou"])),
            ("pixel accuracy", _fmt(iou["pixel_accuracy"])),
            ("mean of per-image mean IoU", _fmt(iou["per_image_mean_iou_average"])),
        ]
    served = report.get("served") or {}
    if served.get("modes"):
        rows.append(("served as", ", ".join(f"{m}: {n}" for m, n in sorted(served["modes"].items()))))
    if served.get("scaled_images"):
        rows.append(("scaled down (not full resolution)", len(served["scaled_images"])))
    if report.get("stopped"):
        rows.append(("stopped early", report["stopped"]))
    body = "".join(
        f"<tr><th>{escape(str(k))}</th><td class='num'>{escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{body}</table>"


def _class_table(classes: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{c['index']}</td><td>{escape(c['label'])}</td><td class='num'>{_fmt(c['iou'])}"
        f"</td><td class='num'>{c['intersection']}</td><td class='num'>{c['union']}</td></tr>"
        for c in classes
    )
    return (
        "<table><tr><th>#</th><th>class</th><th>IoU</th><th>intersection</th><th>union</th></tr>"
        f"{rows}</table>"
    )


def _colour(index: int) -> str:
    r, g, b = (int(v) for v in PALETTE[index])
    return f"rgb({r},{g},{b})" if index else "rgb(90,90,90)"


def _bars_svg(classes: list[dict[str, Any]]) -> str:
    row, label_w, bar_w = 22, 160, 520
    height = row * len(classes) + 30
    items = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{label_w + bar_w + 80}' height='{height}'>"
    ]
    for tick in range(0, 11, 2):
        x = label_w + bar_w * tick / 10
        items.append(
            f"<line x1='{x}' y1='0' x2='{x}' y2='{height - 20}' stroke='#eee'/>"
            f"<text x='{x}' y='{height - 6}' font-size='11' text-anchor='middle'>{tick / 10:.1f}</text>"
        )
    for i, c in enumerate(classes):
        y = i * row
        items.append(
            f"<text x='{label_w - 6}' y='{y + 15}' font-size='12' text-anchor='end'>{escape(c['label'])}</text>"
        )
        if c["iou"] is None:
            items.append(
                f"<text x='{label_w + 4}' y='{y + 15}' font-size='11' fill='#999'>absent</text>"
            )
            continue
        w = bar_w * c["iou"]
        items.append(
            f"<rect x='{label_w}' y='{y + 3}' width='{w:.1f}' height='{row - 6}' fill='{_colour(c['index'])}'/>"
            f"<text x='{label_w + w + 4:.1f}' y='{y + 15}' font-size='11'>{c['iou']:.3f}</text>"
        )
    return "".join(items) + "</svg>"


def _heatmap_svg(matrix: dict[str, Any]) -> str:
    counts = np.asarray(matrix["counts"], np.float64)
    labels = matrix["labels"]
    n = len(labels)
    cell = max(14, min(48, 640 // max(n, 1)))
    longest = max((len(label) for label in labels), default=1)
    margin = min(130, 16 + 7 * longest)  # left: labels; top: labels at 45 degrees
    top = min(100, 12 + 5 * longest)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    items = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{margin + cell * n + 60}' "
        f"height='{top + cell * n + 10}'>"
    ]
    for i, label in enumerate(labels):
        items.append(
            f"<text x='{margin - 6}' y='{top + i * cell + cell * 0.65:.1f}' font-size='11' "
            f"text-anchor='end'>{escape(label)}</text>"
        )
        cx = margin + i * cell + cell / 2
        items.append(
            f"<text x='{cx:.1f}' y='{top - 6}' font-size='11' "
            f"transform='rotate(-45 {cx:.1f} {top - 6})'>{escape(label)}</text>"
        )
        for j in range(n):
            shade = int(255 - 200 * share[i, j])
            fill = f"rgb({shade},{shade},255)"
            x, y = margin + j * cell, top + i * cell
            items.append(
                f"<rect x='{x}' y='{y}' width='{cell}' height='{cell}' fill='{fill}' stroke='#fff'>"
                f"<title>{escape(labels[i])} -> {escape(labels[j])}: {int(counts[i, j])}</title></rect>"
            )
            if cell >= 30:
                colour = "#fff" if share[i, j] > 0.6 else "#333"
                items.append(
                    f"<text x='{x + cell / 2:.1f}' y='{y + cell * 0.6:.1f}' font-size='10' "
                    f"text-anchor='middle' fill='{colour}'>{share[i, j]:.2f}</text>"
                )
    return "".join(items) + "</svg>"


def _histogram_svg(dist: dict[str, Any]) -> str:
    counts = dist["histogram"]["counts"]
    width, height, pad = 520, 180, 30
    top = max(max(counts), 1)
    bar = width / len(counts)
    items = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width + 2 * pad}' height='{height + 2 * pad}'>"
    ]
    for i, count in enumerate(counts):
        h = height * count / top
        x = pad + i * bar
        items.append(
            f"<rect x='{x:.1f}' y='{pad + height - h:.1f}' width='{bar - 2:.1f}' height='{h:.1f}' "
            f"fill='#4a7bd0'/><text x='{x + bar / 2:.1f}' y='{pad + height - h - 3:.1f}' "
            f"font-size='10' text-anchor='middle'>{count}</text>"
        )
    for i in range(0, len(counts) + 1, 2):
        items.append(
            f"<text x='{pad + i * bar:.1f}' y='{pad + height + 14}' font-size='11' "
            f"text-anchor='middle'>{i / len(counts):.1f}</text>"
        )
    stats = ", ".join(
        f"{k} {dist[k]:.3f}" for k in ("min", "p10", "median", "p90", "max") if k in dist
    )
    items.append(
        f"<text x='{pad}' y='{pad - 10}' font-size='11'>{dist['count']} images; {stats}</text>"
    )
    return "".join(items) + "</svg>"


def _img_tag(rgb: np.ndarray, alt: str) -> str:
    data = base64.b64encode(encode_png(thumbnail(rgb), rgb=True)).decode()
    return f"<img alt='{escape(alt)}' src='data:image/png;base64,{data}'/>"


def _worst(worst: list[dict[str, Any]], records: dict[str, dict[str, Any]], out_root: Path) -> str:
    figures = []
    for item in worst:
        record = records[item["image"]]
        try:
            figures.append(_worst_figure(record, out_root, item["mean_iou"]))
        except (OSError, ValueError, cv2.error) as exc:
            log.warning("report: no thumbnails for %s: %s", record["key"], exc)
            figures.append(
                f"<figure>{escape(record['key'])}: no preview ({escape(str(exc))})</figure>"
            )
    return "<div>" + "".join(figures) + "</div>"


def _worst_figure(record: dict[str, Any], out_root: Path, miou: float | None) -> str:
    bgr = cv2.imread(record["image"], cv2.IMREAD_COLOR)
    mask = cv2.imread(str(out_root / record["mask"]), cv2.IMREAD_UNCHANGED)
    if bgr is None or mask is None:
        raise ValueError("image or mask no longer readable")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    tags = [_img_tag(rgb, "image"), _img_tag(overlay(rgb, mask), "prediction")]
    truth = cv2.imread(record["gt"], cv2.IMREAD_UNCHANGED) if record.get("gt") else None
    if truth is not None and truth.shape == mask.shape:
        tags.append(_img_tag(overlay(rgb, truth), "ground truth"))
    caption = f"{escape(record['key'])} — mIoU {_fmt(miou, 3)}"
    return f"<figure>{''.join(tags)}<figcaption>{caption}</figcaption></figure>"


def render_classify_html(report: dict[str, Any]) -> str:
    """The classify report page: accuracy, per-class recall, confusion heat map, failures."""
    rows = [
        ("images", report["images"]),
        ("classified", report["classified"]),
        ("failed", report["failed"]),
        ("scored (labelled)", report["scored"]),
        ("top-1 accuracy", _fmt(report["accuracy"])),
    ]
    summary = "".join(
        f"<tr><th>{escape(str(k))}</th><td class='num'>{escape(str(v))}</td></tr>" for k, v in rows
    )
    recall = "".join(
        f"<tr><td>{escape(c['label'])}</td><td class='num'>{c['images']}</td>"
        f"<td class='num'>{_fmt(c['recall'])}</td></tr>"
        for c in report["classes"]
    )
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>visionserve classify: "
        f"{escape(report['model'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Classification report: {escape(report['model'])}</h1><table>{summary}</table>",
        "<h2>Per-class recall</h2><table><tr><th>class</th><th>images</th><th>recall</th></tr>"
        f"{recall}</table>",
        "<h2>Confusion matrix (rows: true class, columns: predicted; colour: row share)</h2>",
        _heatmap_svg(report["confusion_matrix"]),
    ]
    if report["failures"]:
        failed = "".join(
            f"<tr><td>{escape(f['image'])}</td><td class='bad'>{escape(f['reason'])}</td></tr>"
            for f in report["failures"]
        )
        parts.append(f"<h2>Failures ({len(report['failures'])})</h2><table>{failed}</table>")
    return "\n".join(parts) + "</body></html>"
