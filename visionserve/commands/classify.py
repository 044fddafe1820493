"""``visionserve classify``: classify a folder (or glob, or list file) of images through a server.

Writes a CSV of the top-k labels and scores per image; with ``--labels`` (a CSV with
columns ``image,label``, as ``visionserve generate`` writes) also a report next to it
(``<out>.report.json`` and ``.report.html``) with top-1 accuracy and the confusion matrix.
Exit codes: 0 all classified; 1 some failed; 2 bad usage or model; 3 server unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
from pathlib import Path

from tqdm import tqdm

from visionserve.clients import AsyncVisionClient, ClassifyResult, VisionServeError
from visionserve.clients._files import relative_key, resolve_inputs
from visionserve.clients._html import render_classify_html
from visionserve.commands._args import positive_int
from visionserve.commands.segment import client_options
from visionserve.server.atomic import remove_partials, write_atomic

NAME = "classify"
HELP = "Classify a folder of images through a server; CSV of top-k labels"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="folder (recursive), glob, image, or list file")
    parser.add_argument("--server", required=True, help="HOST:PORT of a visionserve server")
    parser.add_argument("--model", required=True, help="model name in the server's repository")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--top-k", type=positive_int, default=3, help="labels per image (default: 3)")
    parser.add_argument(
        "--labels", type=Path, help="CSV image,label of true labels: accuracy + confusion report"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=16, help="requests in flight (default: 16)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    parser.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
    parser.add_argument("--ca", type=Path, help="PEM root certificate(s) to verify the server")
    parser.add_argument("--cert", type=Path, help="client certificate chain PEM (mutual TLS)")
    parser.add_argument("--key", type=Path, help="client private key PEM (mutual TLS)")
    parser.add_argument("--token", help="bearer token (or env VISIONSERVE_TOKEN)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_labels(path: Path) -> dict[str, str]:
    """True labels keyed by file stem."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns image,label")
    return {Path(r["image"]).stem: r["label"] for r in rows}


def run(args: argparse.Namespace) -> int:
    try:
        root, images = resolve_inputs(args.input)
        truth = read_labels(args.labels) if args.labels else None
    except (OSError, ValueError) as exc:
        print(f"visionserve classify: {exc}", file=sys.stderr)
        return 2
    if not images:
        print(f"visionserve classify: no images found in {args.input}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, root, images, truth))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


async def _run(
    args: argparse.Namespace, root: Path, images: list[Path], truth: dict[str, str] | None
) -> int:
    async with AsyncVisionClient(
        args.server, timeout=args.timeout, **client_options(args)
    ) as client:
        try:
            info = await client.get_model(args.model, args.version)
        except VisionServeError as error:
            print(f"cannot use model {args.model!r} on {args.server}: {error}", file=sys.stderr)
            return 3 if error.retryable else 2
        results, failures = await _classify_all(args, client, images)
    keys = {image: relative_key(image, root) for image in images}
    remove_partials(args.out.absolute().parent, recursive=False)  # of a killed earlier run
    _write_csv(args.out, images, keys, results, args.top_k)
    if truth is not None:
        report = accuracy_report(info.name, list(info.labels), truth, results, failures, keys)
        stem = args.out.with_suffix("")
        write_atomic(Path(f"{stem}.report.json"), json.dumps(report, indent=2).encode())
        write_atomic(Path(f"{stem}.report.html"), render_classify_html(report).encode())
        if report["scored"]:
            print(
                f"top-1 accuracy: {report['accuracy']:.4f} ({report['correct']}/{report['scored']})"
            )
        else:
            print("no image matched the labels file", file=sys.stderr)
    print(f"{len(results)}/{len(images)} images classified, results in {args.out}")
    for image, reason in sorted(failures.items()):
        print(f"FAILED {keys[image]}: {reason}", file=sys.stderr)
    return 1 if failures else 0


async def _classify_all(
    args: argparse.Namespace, client: AsyncVisionClient, images: list[Path]
) -> tuple[dict[Path, ClassifyResult], dict[Path, str]]:
    results: dict[Path, ClassifyResult] = {}
    failures: dict[Path, str] = {}
    gate = asyncio.Semaphore(args.concurrency)
    loop = asyncio.get_running_loop()

    async def one(image: Path, bar: tqdm) -> None:
        async with gate:
            try:
                data = await loop.run_in_executor(None, image.read_bytes)
                results[image] = await client.classify(
                    data, model=args.model, version=args.version, top_k=args.top_k
                )
            except (VisionServeError, OSError) as error:
                failures[image] = str(error)
            bar.update(1)

    with tqdm(total=len(images), unit="img", desc="classify", disable=args.no_progress) as bar:
        await asyncio.gather(*(one(image, bar) for image in images))
    return results, failures


def _write_csv(
    out: Path,
    images: list[Path],
    keys: dict[Path, str],
    results: dict[Path, ClassifyResult],
    k: int,
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image"] + [f"{kind}{i + 1}" for i in range(k) for kind in ("label", "score")])
    for image in images:
        if image in results:
            cells = [x for s in results[image].top for x in (s.label, f"{s.score:.6f}")]
            writer.writerow([keys[image]] + cells)
    write_atomic(out, buffer.getvalue().encode())


def accuracy_report(
    model: str,
    labels: list[str],
    truth: dict[str, str],
    results: dict[Path, ClassifyResult],
    failures: dict[Path, str],
    keys: dict[Path, str],
) -> dict[str, object]:
    """Top-1 accuracy and the confusion matrix (rows true, columns predicted) over labelled images."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    unknown: dict[str, str] = {}
    correct = scored = 0
    for image, result in results.items():
        true_label = truth.get(image.stem)
        if true_label is None:
            continue
        if true_label not in index:
            unknown[keys[image]] = true_label
            continue
        scored += 1
        correct += result.label == true_label
        confusion[index[true_label]][index[result.label]] += 1
    per_class = [
        {
            "label": label,
            "images": sum(confusion[i]),
            "recall": round(confusion[i][i] / sum(confusion[i]), 6) if sum(confusion[i]) else None,
        }
        for i, label in enumerate(labels)
    ]
    return {
        "model": model,
        "images": len(keys),
        "classified": len(results),
        "failed": len(failures),
        "scored": scored,
        "correct": correct,
        "accuracy": round(correct / scored, 6) if scored else None,
        "classes": per_class,
        "unknown_true_labels": unknown,
        "confusion_matrix": {
            "rows": "true class",
            "columns": "predicted class",
            "labels": labels,
            "counts": confusion,
        },
        "failures": [{"image": keys[i], "reason": r} for i, r in sorted(failures.items())],
    }
