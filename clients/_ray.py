"""Batch segmentation on a Ray cluster with Ray Data (``visionserve segment --ray``).

The pipeline: ``read_binary_files(paths, include_paths=True)`` -> ``map_batches`` with
:class:`SegmentActor` (each actor loads the model once through the server's own loader,
``server.offline.OfflineModel``; ``compute=ActorPoolStrategy(...)``; ``num_gpus=1`` per
actor when the model's first backend is a GPU one) -> per image, the mask and overlay
written by the actor (atomically, with the same code as the gRPC path) and a small
record back to the driver, which appends it to the journal as results stream in (a
rerun skips what the journal holds) and builds the same report files from it.

The input, ground-truth and output folders must be visible at the same paths on every
node (a shared file system), as they are on one machine with ``--ray local``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
import numpy as np

from visionserve.clients._journal import Journal
from visionserve.clients._offline import Outcome, Scoring, resolve, segment_chunk
from visionserve.clients._results import Job
from visionserve.server.offline import OfflineModel, OfflineSettings

log = logging.getLogger(__name__)


def _path_key(path: str | Path) -> str:
    """How a file is matched between the job list and Ray's ``path`` column."""
    return str(Path(str(path).removeprefix("local://")).resolve())


class SegmentActor:
    """A Ray Data actor: one loaded model, called on batches of ``{"bytes", "path"}``."""

    def __init__(self, settings: OfflineSettings, scoring: Scoring, jobs: dict[str, Job]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.model = OfflineModel(settings)
        self.scoring = scoring
        self.jobs = jobs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = [self.jobs[_path_key(p)] for p in batch["path"]]
        images = [bytes(b) for b in batch["bytes"]]
        outcomes = segment_chunk(self.model, jobs, images, self.scoring)
        return {"outcome": np.array([_encode(o) for o in outcomes], dtype=object)}


def _encode(outcome: Outcome) -> str:
    return json.dumps({"key": outcome.key, "record": outcome.record, "reason": outcome.reason})


def _decode(text: str) -> Outcome:
    item = json.loads(text)
    return Outcome(item["key"], record=item["record"], reason=item["reason"])


def connect(address: str) -> bool:
    """Join (``ADDRESS``, ``auto``) or start (``local``) a Ray cluster, unless this
    process already did; True when this call started it (so it shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def run_ray(
    settings: OfflineSettings,
    jobs: Sequence[Job],
    scoring: Scoring,
    journal: Journal,
    *,
    actors: int,
    batch_size: int,
    on_resolved: Callable[[bool], None],
) -> dict[str, str]:
    """Run ``jobs`` through a Ray Data pipeline on the connected cluster; returns the
    failures by key (every other job is in the journal)."""
    import ray
    import ray.data

    failures: dict[str, str] = {}
    readable = []
    for job in jobs:  # Ray's reader would fail the whole run on one unreadable file
        if job.image.is_file():
            readable.append(job)
        else:
            resolve(
                Outcome(job.key, reason=f"cannot read the file: {job.image}"), journal, failures
            )
            on_resolved(False)
    if not readable:
        return failures
    jobs = readable
    by_path = {_path_key(job.image): job for job in jobs}
    gpus = 1 if settings.wants_gpu() else 0
    if gpus and not ray.cluster_resources().get("GPU"):  # the actors would wait forever
        raise ValueError(
            f"the model's first backend ({settings.backend_preference()[0]}) needs a GPU per "
            f"actor, but the Ray cluster has none: pass --backends onnxruntime-cpu"
        )
    if not gpus and settings.intra_op_threads == 0:  # one CPU per actor, one thread each
        settings = dataclasses.replace(settings, intra_op_threads=1)
    dataset = ray.data.read_binary_files([str(job.image) for job in jobs], include_paths=True)
    results = dataset.map_batches(
        SegmentActor,
        fn_constructor_kwargs={"settings": settings, "scoring": scoring, "jobs": by_path},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=0 if gpus else 1,
    )
    log.info("Ray Data: %d images, %d actors, %d GPU each", len(jobs), actors, gpus)
    for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
        for text in batch["outcome"]:
            outcome = _decode(str(text))
            resolve(outcome, journal, failures)
            on_resolved(outcome.reason is None)
    return failures


def default_actors(gpu: bool) -> int:
    """One actor per GPU of the cluster for a GPU backend; else one per CPU but one, left
    to the read tasks (actors holding every CPU would starve them: the run would hang)."""
    import ray

    resources = ray.cluster_resources()
    if gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 2)) - 1)
