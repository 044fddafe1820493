"""Batch segmentation without a server: the model in this process (threads), or in Ray
Data actors (``_ray.py``). Both hand each chunk of images to :func:`segment_chunk`,
which runs them through ``server.offline.OfflineModel`` (the server's own walk) and
writes masks, overlays and records with the same code as the gRPC path
(``_results``), so masks, journal and report files are the same."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionserve.clients._journal import Journal
from visionserve.clients._render import decode_index_mask
from visionserve.clients._results import Job, build_record, served_fields, write_outputs
from visionserve.server.offline import OfflineModel


@dataclass(frozen=True)
class Scoring:
    """What the records need besides the mask (picklable: it travels to Ray actors)."""

    num_classes: int
    ignore_index: int
    out_root: Path


@dataclass(frozen=True)
class Outcome:
    """One image done (``record``, for the journal) or failed (``reason``)."""

    key: str
    record: dict[str, Any] | None = None
    reason: str | None = None


def segment_chunk(
    model: OfflineModel, jobs: Sequence[Job], images: Sequence[bytes | OSError], scoring: Scoring
) -> list[Outcome]:
    """Segment ``images`` (the encoded files of ``jobs``, or why one could not be read)
    together, score them against their ground truth and write their files; one outcome
    per job, in order."""
    problems: dict[int, str] = {}
    truths: dict[int, Any] = {}
    for i, (job, image) in enumerate(zip(jobs, images, strict=True)):
        if isinstance(image, OSError):
            problems[i] = f"cannot read the file: {image}"
            continue
        try:
            truths[i] = None if job.gt is None else decode_index_mask(job.gt.read_bytes())
        except (OSError, ValueError) as exc:
            problems[i] = f"cannot read the file: {job.gt}: {exc}"
    ready = [i for i in range(len(jobs)) if i not in problems]
    results = dict(zip(ready, model.segment_results([images[i] for i in ready]), strict=True))
    outcomes = []
    for i, job in enumerate(jobs):
        result = results.get(i)
        if isinstance(result, Exception):
            problems[i] = f"{type(result).__name__}: {result}"
        if i in problems:
            outcomes.append(Outcome(job.key, reason=problems[i]))
            continue
        try:
            mask, serving = result.mask, result.serving
            record = build_record(job, mask, truths[i], scoring.num_classes, scoring.ignore_index)
            if serving is not None:
                record.update(served_fields(serving.mode, serving.describe(), serving.scale))
            write_outputs(job, mask, record, scoring.out_root, images[i])
        except Exception as exc:  # noqa: BLE001 - one image's failure, listed in the report
            outcomes.append(Outcome(job.key, reason=f"{type(exc).__name__}: {exc}"))
            continue
        outcomes.append(Outcome(job.key, record=record))
    return outcomes


def chunks(jobs: Sequence[Job], size: int) -> Iterator[Sequence[Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def run_local(
    model: OfflineModel,
    jobs: Sequence[Job],
    scoring: Scoring,
    journal: Journal,
    *,
    threads: int,
    chunk: int,
    on_resolved: Callable[[bool], None],
) -> dict[str, str]:
    """Segment ``jobs`` in this process, ``threads`` chunks of ``chunk`` images at a
    time (their requests batch in the model's batcher); returns the failures by key."""
    failures: dict[str, str] = {}

    def one(part: Sequence[Job]) -> list[Outcome]:
        return segment_chunk(model, part, [read(job.image) for job in part], scoring)

    with ThreadPoolExecutor(threads, thread_name_prefix="segment") as pool:
        for outcomes in pool.map(one, chunks(jobs, chunk)):
            for outcome in outcomes:
                resolve(outcome, journal, failures)
                on_resolved(outcome.reason is None)
    return failures


def read(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


def resolve(outcome: Outcome, journal: Journal, failures: dict[str, str]) -> None:
    """Journal a finished image (its files are in place), or note why it failed."""
    if outcome.record is not None:
        journal.append(outcome.record)
    else:
        failures[outcome.key] = outcome.reason or "unknown failure"
