"""A model version served in-process, without gRPC: ``visionserve segment --repository``.

The model is loaded as the server loads it (``registry.load_model``: the same backend
choice, overrides and warm-up) and each image takes the server's own walk,
``ServedModel.begin -> submit -> finish`` on a ``requests.SegmentInput``: the same
decoder and pixel limit, the same dynamic batcher, the same mask back at the image's
size. So masks are those a server would return.
Used by one process (threads) and by each Ray Data actor (``clients/_ray.py``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionserve.server.backends.registry import GPU_BACKENDS
from visionserve.server.model_config import check_backends
from visionserve.server.registry import load_model
from visionserve.server.repository import ModelRepository
from visionserve.server.requests import ImageData, RequestLimits, SegmentInput, SegmentResult
from visionserve.server.served_model import Job, ServedModel, wait_for

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = RequestLimits().max_decoded_pixels


@dataclass(frozen=True)
class OfflineSettings:
    """Which model to load from where, and how (picklable: it travels to Ray actors)."""

    repository: Path
    model: str
    version: str = ""
    backends: tuple[str, ...] | None = None  # None: the model.yaml's list
    intra_op_threads: int = 0  # 0: the usable cores divided by the model's instances
    max_decoded_pixels: int = DEFAULT_MAX_PIXELS
    warmup: bool = True
    overrides: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if self.backends is not None:
            object.__setattr__(self, "backends", tuple(self.backends))
            check_backends(self.backends)
        if self.intra_op_threads < 0 or self.max_decoded_pixels < 1:
            raise ValueError(
                f"intra_op_threads must be >= 0 and max_decoded_pixels >= 1, got "
                f"{self.intra_op_threads}, {self.max_decoded_pixels}"
            )

    def backend_preference(self) -> tuple[str, ...]:
        """The backends that will be tried, in order."""
        if self.backends is not None:
            return self.backends
        return ModelRepository(self.repository).config(self.model).backends

    def wants_gpu(self) -> bool:
        """True when the first backend tried is a GPU one (a Ray actor then asks for one)."""
        return self.backend_preference()[0] in GPU_BACKENDS


class OfflineModel:
    """One loaded segmentation model version; ``segment`` is thread-safe (it batches)."""

    def __init__(self, settings: OfflineSettings) -> None:
        self.settings = settings
        entry = ModelRepository(settings.repository).entry(settings.model, settings.version)
        overrides = dict(settings.overrides)
        if settings.backends is not None:
            overrides["backends"] = settings.backends
        self.model: ServedModel = load_model(
            entry,
            overrides=overrides,
            intra_op_threads=settings.intra_op_threads,
            warmup=settings.warmup,
            limits=RequestLimits(max_decoded_pixels=settings.max_decoded_pixels),
        )
        self.model.require_task("segmentation", "segment")
        log.info("%s v%d loaded in-process", self.model.name, self.model.version)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version

    def segment(self, images: list[bytes]) -> list[np.ndarray | Exception]:
        """Encoded images -> uint8 masks at each image's size, as a server answers
        Segment; an image that cannot be decoded or inferred gets its exception instead.
        Submitted together, they batch."""
        return [r if isinstance(r, Exception) else r.mask for r in self.segment_results(images)]

    def segment_results(self, images: list[bytes]) -> list[SegmentResult | Exception]:
        """``segment``, with each image's whole result (its mask and how it was served)."""
        jobs: list[Job | Exception] = []
        for data in images:
            try:  # raw: the mask is used as an array, its encoding (PNG) is the writer's
                jobs.append(self.model.begin(SegmentInput(ImageData(data), mask_format="raw")))
            except Exception as exc:  # noqa: BLE001 - one image's failure, reported with it
                jobs.append(exc)
        inline = len(images) == 1
        futures: list[Future | Exception] = []
        for job in jobs:
            try:
                futures.append(
                    job
                    if isinstance(job, Exception)
                    else self.model.submit_job(job, inline=inline)
                )
            except Exception as exc:  # noqa: BLE001 - e.g. the queue is full
                futures.append(exc)
        results: list[SegmentResult | Exception] = []
        for job, future in zip(jobs, futures, strict=True):
            if isinstance(future, Exception):
                results.append(future)
                continue
            try:
                results.append(self.model.finish(job, wait_for(future, None)))
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    def close(self) -> None:
        self.model.close()
