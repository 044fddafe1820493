"""``visionserve segment``: segment a folder, glob or list of images through a server.

Writes OUT/masks/<relative path>.png (index masks, the image's original size), with
``--overlays`` OUT/overlays/<relative path>.png, and with ``--gt`` a dataset IoU report
(OUT/report.json, report_*.csv, report.html). Resumable: OUT/.visionserve-journal.jsonl
records every finished image; a rerun skips them and rebuilds the report.

Exit codes: 0 all done; 1 some images failed; 2 bad usage or model; 3 stopped early
(server unreachable: rerun to continue); 130 interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tqdm import tqdm

from visionserve.clients import AsyncVisionClient, VisionServeError
from visionserve.clients._batch import BatchRunner, BatchSettings, BatchStopped, Job
from visionserve.clients._files import match_ground_truth, output_path, relative_key, resolve_inputs
from visionserve.clients._html import render_html
from visionserve.clients._journal import JOURNAL_NAME, Journal, JournalMismatch
from visionserve.clients._report import build_report, dataset_iou, write_report
from visionserve.commands._args import existing_dir, positive_int

NAME = "segment"
HELP = "Segment a folder of images through a server; masks + IoU report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        help="folder (searched recursively), glob ('data/**/*.jpg'), image, "
        "or list file (one path per line)",
    )
    parser.add_argument("--server", required=True, help="HOST:PORT of a visionserve server")
    parser.add_argument("--model", required=True, help="model name in the server's repository")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (masks/, overlays/, report.*)"
    )
    parser.add_argument(
        "--gt", type=existing_dir, help="folder of ground-truth index masks, matched by stem"
    )
    parser.add_argument(
        "--ignore-index",
        type=_ignore_index,
        help="ground-truth value left out of IoU (default: the model's)",
    )
    parser.add_argument("--overlays", action="store_true", help="also write colour overlays")
    parser.add_argument(
        "--server-iou",
        action="store_true",
        help="also send the ground truth to the server and check its per-image IoU counts "
        "against the client's (costs the server a decode and a scoring per image)",
    )
    parser.add_argument(
        "--streams", type=positive_int, default=4, help="parallel streams (default 4)"
    )
    parser.add_argument(
        "--window", type=positive_int, default=16, help="requests in flight per stream (default 16)"
    )
    parser.add_argument(
        "--per-message",
        type=positive_int,
        default=8,
        help="requests per stream message, up to (default 8; 1: SegmentStream, one per message)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="threads for file I/O and PNG work (default 2)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="per-request deadline, seconds (default 60)"
    )
    parser.add_argument(
        "--give-up-after",
        type=float,
        default=60.0,
        help="stop when the server has not answered for this long, seconds (default 60)",
    )
    parser.add_argument(
        "--restart", action="store_true", help="forget an earlier run's journal in --out"
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
    security.add_argument(
        "--ca", type=Path, help="PEM root certificate(s) to verify the server (implies TLS)"
    )
    security.add_argument("--cert", type=Path, help="client certificate chain PEM (mutual TLS)")
    security.add_argument("--key", type=Path, help="client private key PEM (mutual TLS)")
    security.add_argument("--token", help="bearer token (or env VISIONSERVE_TOKEN)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _ignore_index(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 255:
        raise argparse.ArgumentTypeError(f"expected 0..255 (masks are uint8), got {value}")
    return number


def client_options(args: argparse.Namespace) -> dict[str, object]:
    """Keyword arguments for VisionClient / AsyncVisionClient from the security options."""
    import os

    return {
        "tls": args.tls,
        "root_certificates": args.ca,
        "certificate_chain": args.cert,
        "private_key": args.key,
        "token": args.token or os.environ.get("VISIONSERVE_TOKEN") or None,
    }


def run(args: argparse.Namespace) -> int:
    try:
        root, images = resolve_inputs(args.input)
    except (FileNotFoundError, OSError) as exc:
        print(f"visionserve segment: {exc}", file=sys.stderr)
        return 2
    if not images:
        print(f"visionserve segment: no images found in {args.input}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, root, images))
    except KeyboardInterrupt:
        print(
            "interrupted: finished images are recorded; rerun the same command to continue",
            file=sys.stderr,
        )
        return 130


async def _run(args: argparse.Namespace, root: Path, images: list[Path]) -> int:
    async with AsyncVisionClient(
        args.server, timeout=args.timeout, **client_options(args)
    ) as client:
        try:
            info = await client.get_model(args.model, args.version)
        except VisionServeError as error:
            print(f"cannot use model {args.model!r} on {args.server}: {error}", file=sys.stderr)
            return 3 if error.retryable else 2
        if info.task != "segmentation":
            print(
                f"{args.model!r} is a {info.task} model: segment needs a segmentation model",
                file=sys.stderr,
            )
            return 2
        ignore = info.ignore_index if args.ignore_index is None else args.ignore_index
        settings = {
            "model": info.name,
            "version": info.version,
            "input": str(root.absolute()),
            "gt": str(args.gt.absolute()) if args.gt else None,
            "ignore_index": ignore if args.gt else None,
        }
        journal_path = args.out / JOURNAL_NAME
        if args.restart:
            journal_path.unlink(missing_ok=True)
        try:
            journal = Journal(journal_path, settings)
        except (JournalMismatch, ValueError) as exc:
            print(f"visionserve segment: {exc}", file=sys.stderr)
            return 2
        keys, jobs, failures = _plan(args, root, images, journal)
        batch = BatchSettings(
            model=info.name,
            version=info.version,
            num_classes=len(info.labels),
            ignore_index=ignore,
            send_ignore_index=args.ignore_index is not None,
            server_iou=args.server_iou,
            streams=args.streams,
            window=args.window,
            per_message=args.per_message,
            timeout=args.timeout,
            give_up_after=args.give_up_after,
            threads=args.threads,
            out_root=args.out,
        )
        stopped = await _execute(
            args, client, batch, journal, jobs, len(keys) - len(jobs) - len(failures)
        )
        failures.update(stopped[1])
        return _finish(args, info, keys, journal, failures, stopped[0])


def _plan(
    args: argparse.Namespace, root: Path, images: list[Path], journal: Journal
) -> tuple[list[str], list[Job], dict[str, str]]:
    """(every key, the jobs still to do, failures known up front)."""
    gts = match_ground_truth(images, root, args.gt) if args.gt else dict.fromkeys(images)
    keys, jobs, failures = [], [], {}
    for image in images:
        key = relative_key(image, root)
        keys.append(key)
        mask = output_path(image, root, args.out / "masks")
        over = output_path(image, root, args.out / "overlays") if args.overlays else None
        if journal.finished(key, mask) and (over is None or over.is_file()):
            continue
        if args.gt and gts[image] is None:
            failures[key] = (
                f"no ground truth with stem {image.stem!r} (exactly one) under {args.gt}"
            )
            continue
        jobs.append(Job(key, image, gts[image], mask, over))
    return keys, jobs, failures


async def _execute(
    args: argparse.Namespace,
    client: AsyncVisionClient,
    batch: BatchSettings,
    journal: Journal,
    jobs: list[Job],
    skipped: int,
) -> tuple[str | None, dict[str, str]]:
    """Run the jobs with a progress bar; (why it stopped early or None, per-image failures)."""
    bar = tqdm(
        total=len(jobs) + skipped,
        initial=skipped,
        unit="img",
        desc="segment",
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    failed = 0

    def resolved(ok: bool) -> None:
        nonlocal failed
        failed += not ok
        bar.update(1)
        if not ok:
            bar.set_postfix(failed=failed, refresh=False)

    runner = BatchRunner(client, batch, journal, on_resolved=resolved)
    stopped = None
    with journal, bar:
        try:
            await runner.run(jobs)
        except BatchStopped as exc:
            stopped = str(exc)
    return stopped, runner.failures


def _finish(
    args: argparse.Namespace,
    info: object,
    keys: list[str],
    journal: Journal,
    failures: dict[str, str],
    stopped: str | None,
) -> int:
    labels = list(info.labels)
    report = build_report(
        model=info.name,
        version=info.version,
        labels=labels,
        keys=keys,
        records=journal.records,
        failures=failures,
        stopped=stopped,
    )
    write_report(
        args.out,
        report,
        keys,
        journal.records,
        failures,
        render_html(report, journal.records, args.out),
    )
    if "iou" in report:
        totals, _ = dataset_iou(labels, (journal.records[k] for k in keys if k in journal.records))
        print(totals.table())
    print(
        f"{report['segmented']}/{len(keys)} images segmented; masks in {args.out / 'masks'}, "
        f"report in {args.out / 'report.html'}"
    )
    for item in report["failures"]:
        print(f"FAILED {item['image']}: {item['reason']}", file=sys.stderr)
    if stopped:
        print(f"STOPPED: {stopped}", file=sys.stderr)
        return 3
    return 1 if failures else 0
