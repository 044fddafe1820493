"""``visionserve segment``: segment a folder of images through a server.

Writes one index mask (PNG, the image's original size) per image, mirroring the input
tree, and, with ``--gt``, prints and writes dataset-level per-class IoU.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import cv2
from tqdm import tqdm

from visionserve.clients import DatasetIoU, VisionClient, VisionServeError
from visionserve.clients._files import find_images, match_ground_truth, output_path, write_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="folder of images (searched recursively) or one image")
    parser.add_argument("--server", required=True, help="HOST:PORT of a visionserve server")
    parser.add_argument("--model", required=True, help="model name in the server's repository")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument("--out", type=Path, required=True, help="folder for masks and report.json")
    parser.add_argument("--gt", type=Path, help="folder of ground-truth index masks, matched by file stem")
    parser.add_argument("--ignore-index", type=int, help="ground-truth value left out of IoU (default: the model's)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")


def _segment_one(client: VisionClient, args: argparse.Namespace, image: Path, gt: Path | None):
    result = client.segment(image, model=args.model, version=args.version, ground_truth=gt,
                            ignore_index=args.ignore_index, timeout=args.timeout)
    ok, png = cv2.imencode(".png", result.mask)
    if not ok:
        raise RuntimeError("could not encode the mask as PNG")
    write_atomic(output_path(image, args.input, args.out), png.tobytes())
    return result


def run(args: argparse.Namespace) -> int:
    images = find_images(args.input)
    if not images:
        print(f"no images found in {args.input}", file=sys.stderr)
        return 2
    gts = match_ground_truth(images, args.input, args.gt) if args.gt else dict.fromkeys(images)
    failures: dict[str, str] = {}
    with VisionClient(args.server, timeout=args.timeout) as client:
        try:
            info = client.get_model(args.model, args.version)
        except VisionServeError as error:
            print(f"cannot use model {args.model!r} on {args.server}: {error}", file=sys.stderr)
            return 2
        totals = DatasetIoU(list(info.labels))
        for image, gt in gts.items():
            if args.gt and gt is None:
                failures[str(image)] = f"no ground truth with stem {image.stem!r} under {args.gt}"
        todo = [i for i in images if str(i) not in failures]
        with ThreadPoolExecutor(max(1, args.concurrency)) as pool, \
                tqdm(total=len(todo), unit="img", desc="segment") as bar:
            futures = {pool.submit(_segment_one, client, args, i, gts[i]): i for i in todo}
            for future in as_completed(futures):
                try:
                    result = future.result()
                    if result.iou is not None:
                        totals.add(result.iou)
                except (VisionServeError, OSError, RuntimeError, ValueError) as error:
                    failures[str(futures[future])] = str(error)
                bar.update(1)
    return _report(args, images, totals, failures)


def _report(args: argparse.Namespace, images: list[Path], totals: DatasetIoU,
            failures: dict[str, str]) -> int:
    report = {"model": args.model, "images": len(images), "segmented": len(images) - len(failures),
              "failed": len(failures), "failures": failures}
    if args.gt:
        report["iou"] = totals.to_dict()
        print(totals.table())
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "report.json", json.dumps(report, indent=2).encode())
    print(f"{report['segmented']}/{len(images)} images segmented, masks in {args.out}")
    for path, reason in sorted(failures.items()):
        print(f"FAILED {path}: {reason}", file=sys.stderr)
    return 1 if failures else 0
