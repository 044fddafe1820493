"""``visionserve segment``: segment a folder, glob or list of images through a server,
or without one: ``--repository DIR`` runs the model in this process, ``--ray ADDRESS``
in Ray Data actors on a cluster (``_segment_offline.py``).

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
import signal
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from visionserve.clients import AsyncVisionClient, VisionServeError
from visionserve.clients._batch import BatchRunner, BatchSettings, BatchStopped
from visionserve.clients._files import resolve_inputs
from visionserve.clients._journal import Journal
from visionserve.clients._results import Job
from visionserve.commands._args import existing_dir, positive_int
from visionserve.commands._segment_offline import add_offline_arguments, run_offline
from visionserve.commands._segment_run import finish, open_journal, plan, progress

NAME = "segment"
HELP = "Segment a folder of images (through a server, in-process or on Ray); masks + IoU report"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # both wind the run down, finished images recorded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        help="folder (searched recursively), glob ('data/**/*.jpg'), image, "
        "or list file (one path per line)",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a visionserve server")
    where.add_argument(
        "--repository",
        type=existing_dir,
        help="model repository: run the model in this process (or with --ray, on Ray), no server",
    )
    parser.add_argument("--model", required=True, help="model name in the repository")
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
    add_offline_arguments(parser.add_argument_group("without a server (--repository)"))


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
    if args.repository is None and args.ray is not None:
        print(
            "visionserve segment: --ray needs --repository (the actors load the model)",
            file=sys.stderr,
        )
        return 2
    if args.repository is not None and args.server_iou:
        print("visionserve segment: --server-iou needs --server", file=sys.stderr)
        return 2
    try:
        root, images = resolve_inputs(args.input)
    except (FileNotFoundError, OSError) as exc:
        print(f"visionserve segment: {exc}", file=sys.stderr)
        return 2
    if not images:
        print(f"visionserve segment: no images found in {args.input}", file=sys.stderr)
        return 2
    try:
        if args.repository is not None:
            return run_offline(args, root, images)
        return _interruptible(_run(args, root, images))
    except KeyboardInterrupt as exc:
        print(
            "interrupted: finished images are recorded; rerun the same command to continue",
            file=sys.stderr,
        )
        return 128 + getattr(exc, "signum", signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The run was stopped by ``signum`` (SIGINT or SIGTERM) and has wound down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interruptible(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``; Ctrl-C (SIGINT) or SIGTERM (a job being stopped) cancels it through
    the event loop's own handlers and raises ``Stopped`` once it has wound down (finished
    images recorded), even where a library swallowed the cancellation on its way out."""
    stopped_by = 0

    async def main() -> int:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()

        def on_signal(signum: int) -> None:
            nonlocal stopped_by
            stopped_by = stopped_by or signum
            if task is not None:
                task.cancel()

        if threading.current_thread() is not threading.main_thread():
            return await work  # called from a thread (embedded): signals are not ours
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await work
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    try:
        code = asyncio.run(main())
    except asyncio.CancelledError:
        if not stopped_by:
            raise
    if stopped_by:
        raise Stopped(stopped_by)
    return code


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
        journal = open_journal(args, root, info.name, info.version, ignore)
        if journal is None:
            return 2
        keys, jobs, failures = plan(args, root, images, journal)
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
        return finish(args, info, keys, journal, failures, stopped[0])


async def _execute(
    args: argparse.Namespace,
    client: AsyncVisionClient,
    batch: BatchSettings,
    journal: Journal,
    jobs: list[Job],
    skipped: int,
) -> tuple[str | None, dict[str, str]]:
    """Run the jobs with a progress bar; (why it stopped early or None, per-image failures)."""
    bar, resolved = progress(args, len(jobs), skipped)
    runner = BatchRunner(client, batch, journal, on_resolved=resolved)
    stopped = None
    with journal, bar:
        try:
            await runner.run(jobs)
        except BatchStopped as exc:
            stopped = str(exc)
    return stopped, runner.failures
