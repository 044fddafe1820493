"""``visionserve classify``: classify a folder of images through a server.

Writes a CSV of the top-k labels and scores per image; with ``--labels`` (a CSV with
columns ``image,label``, as ``visionserve generate`` writes), prints the accuracy.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from visionserve.clients import ClassifyResult, VisionClient, VisionServeError
from visionserve.clients._files import find_images, write_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="folder of images (searched recursively) or one image")
    parser.add_argument("--server", required=True, help="HOST:PORT of a visionserve server")
    parser.add_argument("--model", required=True, help="model name in the server's repository")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--top-k", type=int, default=3, help="labels per image (default: 3)")
    parser.add_argument("--labels", type=Path, help="CSV image,label of true labels: prints accuracy")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")


def read_labels(path: Path) -> dict[str, str]:
    """True labels keyed by file stem."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns image,label")
    return {Path(r["image"]).stem: r["label"] for r in rows}


def run(args: argparse.Namespace) -> int:
    images = find_images(args.input)
    if not images:
        print(f"no images found in {args.input}", file=sys.stderr)
        return 2
    results: dict[Path, ClassifyResult] = {}
    failures: dict[str, str] = {}
    with VisionClient(args.server, timeout=args.timeout) as client, \
            ThreadPoolExecutor(max(1, args.concurrency)) as pool, \
            tqdm(total=len(images), unit="img", desc="classify") as bar:
        futures = {pool.submit(client.classify, i, model=args.model, version=args.version,
                               top_k=args.top_k): i for i in images}
        for future in as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except (VisionServeError, OSError, ValueError) as error:
                failures[str(futures[future])] = str(error)
            bar.update(1)
    _write_csv(args.out, images, results, args.top_k)
    if args.labels:
        _print_accuracy(read_labels(args.labels), results)
    print(f"{len(results)}/{len(images)} images classified, results in {args.out}")
    for path, reason in sorted(failures.items()):
        print(f"FAILED {path}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def _write_csv(out: Path, images: list[Path], results: dict[Path, ClassifyResult], k: int) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image"] + [f"{kind}{i + 1}" for i in range(k) for kind in ("label", "score")])
    for image in images:
        if image in results:
            cells = [x for s in results[image].top for x in (s.label, f"{s.score:.6f}")]
            writer.writerow([str(image)] + cells)
    write_atomic(out, buffer.getvalue().encode())


def _print_accuracy(truth: dict[str, str], results: dict[Path, ClassifyResult]) -> None:
    scored = [(truth[p.stem], r.label) for p, r in results.items() if p.stem in truth]
    if not scored:
        print("no image matched the labels file", file=sys.stderr)
        return
    correct = sum(t == p for t, p in scored)
    confusion: dict[str, dict[str, int]] = {}
    for t, p in scored:
        confusion.setdefault(t, {}).setdefault(p, 0)
        confusion[t][p] += 1
    print(f"top-1 accuracy: {correct / len(scored):.4f} ({correct}/{len(scored)})")
    print("confusion (true -> predicted counts):", json.dumps(confusion, sort_keys=True))
