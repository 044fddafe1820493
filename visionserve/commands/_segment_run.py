"""What every way of running ``visionserve segment`` shares: the journal, the plan
(which images are left, their output paths and ground truth), the progress bar, and
the report at the end."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from visionserve.clients._files import match_ground_truth, output_path, relative_key
from visionserve.clients._html import render_html
from visionserve.clients._journal import JOURNAL_NAME, Journal, JournalMismatch
from visionserve.clients._report import build_report, dataset_iou, write_report
from visionserve.clients._results import Job
from visionserve.server.atomic import remove_partials


def open_journal(
    args: argparse.Namespace, root: Path, model: str, version: str, ignore: int
) -> Journal | None:
    """The run's journal in ``args.out`` (None, said on stderr, when it belongs to a run
    with other settings). Runs through a server or without one share the format."""
    settings = {
        "model": model,
        "version": version,
        "input": str(root.absolute()),
        "gt": str(args.gt.absolute()) if args.gt else None,
        "ignore_index": ignore if args.gt else None,
    }
    journal_path = args.out / JOURNAL_NAME
    if args.restart:
        journal_path.unlink(missing_ok=True)
    try:
        return Journal(journal_path, settings)
    except (JournalMismatch, ValueError) as exc:
        print(f"visionserve segment: {exc}", file=sys.stderr)
        return None


def plan(
    args: argparse.Namespace, root: Path, images: list[Path], journal: Journal
) -> tuple[list[str], list[Job], dict[str, str]]:
    """(every key, the jobs still to do, failures known up front). Removes the temporary
    files a run killed mid-write (kill -9) left in the output folder."""
    remove_partials(args.out)
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


def progress(
    args: argparse.Namespace, todo: int, skipped: int
) -> tuple[tqdm, Callable[[bool], None]]:
    """The progress bar and the callback that counts one resolved image (ok or not)."""
    bar = tqdm(
        total=todo + skipped,
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

    return bar, resolved


def finish(
    args: argparse.Namespace,
    info: Any,
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
    scaled = report["served"]["scaled_images"]
    if scaled:
        print(
            f"warning: the server scaled down {len(scaled)} image(s) larger than the model's "
            f"largest shape bucket (model policy 'scale'); their masks were scaled back up, not "
            f"segmented at full resolution: {', '.join(scaled[:5])}{' ...' if len(scaled) > 5 else ''}",
            file=sys.stderr,
        )
    for item in report["failures"]:
        print(f"FAILED {item['image']}: {item['reason']}", file=sys.stderr)
    if stopped:
        print(f"STOPPED: {stopped}", file=sys.stderr)
        return 3
    return 1 if failures else 0
