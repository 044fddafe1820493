"""``visionserve segment --repository DIR [--ray ADDRESS]``: no server.

The model is loaded from the repository as the server loads it and runs in this
process (threads feeding its dynamic batcher), or, with ``--ray``, in Ray Data actors
(``clients/_ray.py``). Masks, overlays, journal and report are those of a run through a
server: the same files, the same resumability (a rerun skips what the journal holds).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visionserve.clients._journal import Journal
from visionserve.clients._offline import Scoring, run_local
from visionserve.clients._results import Job
from visionserve.commands._args import comma_list, positive_int
from visionserve.commands._segment_run import finish, open_journal, plan, progress
from visionserve.server.model_config import ModelConfig
from visionserve.server.offline import OfflineModel, OfflineSettings
from visionserve.server.repository import ModelRepository


@dataclass(frozen=True)
class ModelSummary:
    """What the report needs to know of the model (the server path asks GetModel)."""

    name: str
    version: str
    labels: tuple[str, ...]


def add_offline_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on Ray Data actors: a cluster ADDRESS (ray://HOST:10001 or HOST:6379), "
        "'auto' (the cluster this machine belongs to, e.g. under `ray job submit`) or "
        "'local' (start Ray on this machine)",
    )
    group.add_argument(
        "--actors",
        type=positive_int,
        help="Ray actors, each holding the model (default: the cluster's CPUs but one, left "
        "to reading files; its GPUs for a GPU backend)",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        help="images per call into the model (default: the model's max_batch_size)",
    )
    group.add_argument(
        "--backends",
        type=comma_list,
        help="backends to try in order, comma-separated (default: the model.yaml's list)",
    )
    group.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads per model instance (default 0: the cores / instances)",
    )


def run_offline(args: argparse.Namespace, root: Path, images: list[Path]) -> int:
    settings = OfflineSettings(
        repository=args.repository,
        model=args.model,
        version=args.version,
        backends=args.backends,
        intra_op_threads=args.intra_op_threads,
        warmup=args.ray is None,  # each actor warms its own copy
    )
    try:
        entry = ModelRepository(settings.repository).entry(settings.model, settings.version)
    except (OSError, ValueError, LookupError) as exc:
        print(f"cannot use model {args.model!r} from {args.repository}: {exc}", file=sys.stderr)
        return 2
    model_config = entry.config
    if model_config.task != "segmentation":
        print(
            f"{args.model!r} is a {model_config.task} model: segment needs a segmentation model",
            file=sys.stderr,
        )
        return 2
    info = ModelSummary(entry.name, str(entry.version), model_config.labels)
    ignore = model_config.ignore_index if args.ignore_index is None else args.ignore_index
    journal = open_journal(args, root, info.name, info.version, ignore)
    if journal is None:
        return 2
    keys, jobs, failures = plan(args, root, images, journal)
    scoring = Scoring(len(info.labels), ignore, args.out)
    bar, resolved = progress(args, len(jobs), len(keys) - len(jobs) - len(failures))
    with journal, bar:
        done = _execute(args, settings, model_config, jobs, scoring, journal, resolved)
    if isinstance(done, str):
        print(f"visionserve segment: {done}", file=sys.stderr)
        return 2
    failures.update(done)
    return finish(args, info, keys, journal, failures, None)


def _execute(
    args: argparse.Namespace,
    settings: OfflineSettings,
    config: ModelConfig,
    jobs: list[Job],
    scoring: Scoring,
    journal: Journal,
    resolved: Callable[[bool], None],
) -> dict[str, str] | str:
    """Run the jobs here or on Ray: the failures by key, or why nothing could run."""
    batch_size = args.batch_size or config.max_batch_size
    if args.ray is not None:
        try:
            return _on_ray(args, settings, jobs, scoring, journal, batch_size, resolved)
        except ValueError as exc:
            return str(exc)
    if not jobs:
        return {}
    try:
        model = OfflineModel(settings)
    except (OSError, RuntimeError, ValueError) as exc:
        return f"cannot load {args.model!r}: {exc}"
    try:
        threads = max(args.threads, config.instances)
        return run_local(
            model, jobs, scoring, journal, threads=threads, chunk=batch_size, on_resolved=resolved
        )
    finally:
        model.close()


def _on_ray(
    args: argparse.Namespace,
    settings: OfflineSettings,
    jobs: list[Job],
    scoring: Scoring,
    journal: Journal,
    batch_size: int,
    resolved: Callable[[bool], None],
) -> dict[str, str]:
    """``ValueError`` when the run cannot start, or Ray failed it (rerun to continue)."""
    try:
        import ray
        import ray.data  # noqa: F401 - the optional extra
        import ray.exceptions
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray Data: pip install 'visionserve[ray]' ({exc})") from exc
    from visionserve.clients import _ray

    started = _ray.connect(args.ray)
    try:
        actors = args.actors or _ray.default_actors(settings.wants_gpu())
        return _ray.run_ray(
            settings,
            jobs,
            scoring,
            journal,
            actors=actors,
            batch_size=batch_size,
            on_resolved=resolved,
        )
    except ray.exceptions.RayError as exc:
        raise ValueError(
            f"the Ray run failed (finished images are recorded; rerun to continue): {exc}"
        ) from exc
    finally:
        if started:
            ray.shutdown()
