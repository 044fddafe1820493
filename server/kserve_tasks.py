"""ModelInfer's two input forms -> the outputs a request asked for.

``tensor_outputs``: the preprocessed FP32 tensor through the batcher (the ONNX outputs,
and ``LABELS`` / ``SCORES`` for classifiers). ``image_outputs``: encoded images through
``ServedModel`` (decode, prepare, batch, finish: the walk ``visionserve.v1`` takes), each
answered at its own size. Segmentation rule: ``MASK`` is ``[N, H, W]``, so the images of
one request must share a size when ``MASK`` is asked for (else INVALID_ARGUMENT asks for
one request per image); ``INTERSECTION`` / ``UNION`` alone take images of any sizes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from visionserve.server.errors import InvalidArgument, VisionServeError
from visionserve.server.kserve_describe import (
    GROUND_TRUTH,
    IMAGE,
    INTERSECTION,
    LABELS,
    MASK,
    SCORES,
    UNION,
)
from visionserve.server.kserve_tensors import InputTensor, bytes_elements, classification
from visionserve.server.postprocess import top_k
from visionserve.server.requests import (
    ClassifyInput,
    ClassifyResult,
    ImageData,
    MaskData,
    SegmentInput,
    SegmentResult,
)
from visionserve.server.served_model import Job, Result, ServedModel, wait_async


@dataclass(frozen=True)
class InferOptions:
    """What a ModelInfer request asks for besides its inputs."""

    outputs: dict[str, int]  # requested output -> classification class count (0: none)
    top_k: int  # LABELS / SCORES columns; 0: the server's default
    ignore_index: int | None  # None: the model's

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise InvalidArgument(
                f"request parameter 'top_k' is {self.top_k}: expected at least 1 (0: the "
                f"server's default)"
            )


def top_classes(
    probabilities: np.ndarray, k: int, labels: Sequence[str]
) -> dict[str, np.ndarray]:
    """[N, C] probabilities -> ``LABELS`` (BYTES) and ``SCORES`` (FP32) ``[N, min(k, C)]``."""
    rows = [top_k(row, k) for row in probabilities]
    names = np.array([[labels[i].encode() for i, _ in row] for row in rows], dtype=object)
    scores = np.array([[s for _, s in row] for row in rows], dtype=np.float32)
    return {LABELS: names.reshape(len(rows), -1), SCORES: scores.reshape(len(rows), -1)}


def _wanted(
    model: ServedModel, options: InferOptions, available: list[str], default: list[str], form: str
) -> dict[str, int]:
    """The requested outputs (``default`` when none were named), checked before any work."""
    wanted = options.outputs or dict.fromkeys(default, 0)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise InvalidArgument(
            f"requested outputs {unknown} are not outputs of {model.name!r} for {form}: "
            f"expected some of {available}"
        )
    for name, count in wanted.items():
        if count and (model.task != "classification" or name == LABELS):
            raise InvalidArgument(
                f"output {name!r} cannot be classified (class_count {count}): the "
                f"classification extension takes a classifier's [N, classes] scores"
            )
    return wanted


def _select(
    model: ServedModel, computed: dict[str, np.ndarray], wanted: dict[str, int]
) -> dict[str, np.ndarray]:
    """``wanted`` outputs of ``computed``, classified where a class count was asked."""
    selected = {}
    for name, count in wanted.items():
        array = computed[name]
        if count:
            if array.ndim != 2:
                raise InvalidArgument(
                    f"output {name!r} has shape {list(array.shape)}: the classification "
                    f"extension needs [N, classes]"
                )
            array = classification(array, count, model.config.labels)
        selected[name] = array
    return selected


async def tensor_outputs(
    model: ServedModel, tensor: np.ndarray, options: InferOptions, deadline: float | None
) -> dict[str, np.ndarray]:
    """A preprocessed FP32 tensor -> the ONNX outputs (by default all of them), and for
    classifiers ``LABELS`` / ``SCORES`` when asked for."""
    onnx_outputs = [spec.name for spec in model.backend.outputs]
    available = onnx_outputs + ([LABELS, SCORES] if model.task == "classification" else [])
    wanted = _wanted(model, options, available, onnx_outputs, "a preprocessed tensor input")
    computed = dict(await model.infer_async(tensor, deadline))
    if LABELS in wanted or SCORES in wanted:
        probabilities = computed[model.config.outputs["probabilities"]]
        k = options.top_k or model.limits.default_top_k
        computed.update(top_classes(probabilities, k, model.config.labels))
    return _select(model, computed, wanted)


async def image_outputs(
    model: ServedModel,
    inputs: dict[str, InputTensor],
    options: InferOptions,
    deadline: float | None,
    executor: Executor | None = None,
) -> dict[str, np.ndarray]:
    """Encoded images (``IMAGE``, optional ``GROUND_TRUTH``) -> the task's outputs.

    Admitted as one request per image (``ServedModel.admitted``: each image is a row in
    the batcher's queue); decoding and finishing run in ``executor``, never on the event
    loop."""
    encoded = bytes_elements(inputs[IMAGE], model.config.max_batch_size)
    async with model.admitted(deadline, len(encoded)):
        return await _image_outputs(model, encoded, inputs, options, deadline, executor)


async def _image_outputs(
    model: ServedModel,
    encoded: list[bytes],
    inputs: dict[str, InputTensor],
    options: InferOptions,
    deadline: float | None,
    executor: Executor | None,
) -> dict[str, np.ndarray]:
    loop = asyncio.get_running_loop()
    form = f"the {IMAGE!r} input"
    if model.task == "classification":
        if GROUND_TRUTH in inputs:
            raise InvalidArgument(
                f"{GROUND_TRUTH!r} is for segmenters; {model.name!r} is a classifier"
            )
        name = model.config.outputs["probabilities"]
        wanted = _wanted(model, options, [LABELS, SCORES, name], [LABELS, SCORES], form)
        requests = [ClassifyInput(ImageData(data), options.top_k) for data in encoded]
        jobs = await loop.run_in_executor(executor, _begin, model, requests)
        results = await _run(model, jobs, deadline, executor)
        return _select(model, _classes(results, name), wanted)
    scored = GROUND_TRUTH in inputs
    default = [MASK, INTERSECTION, UNION] if scored else [MASK]
    wanted = _wanted(model, options, [MASK, INTERSECTION, UNION], default, form)
    if not scored and (INTERSECTION in wanted or UNION in wanted):
        raise InvalidArgument(
            f"outputs {INTERSECTION!r} and {UNION!r} need a {GROUND_TRUTH!r} input "
            f"(BYTES [N], one PNG index mask per image)"
        )
    truths: list[MaskData | None] = [None] * len(encoded)
    if scored:
        truths = [MaskData(data) for data in bytes_elements(inputs[GROUND_TRUTH], len(encoded))]
        if len(truths) != len(encoded):
            raise InvalidArgument(
                f"{GROUND_TRUTH!r} holds {len(truths)} masks for {len(encoded)} images: "
                f"expected one per image"
            )
    requests = [
        SegmentInput(ImageData(data), truth, options.ignore_index, "raw")
        for data, truth in zip(encoded, truths, strict=True)
    ]
    jobs = await loop.run_in_executor(executor, _begin, model, requests)
    if MASK in wanted:
        _check_same_size([job.image for job in jobs])
    results = await _run(model, jobs, deadline, executor)
    return _select(model, _masks(results, MASK in wanted), wanted)


def _begin(model: ServedModel, requests: Sequence[ClassifyInput | SegmentInput]) -> list[Job]:
    """``ServedModel.begin`` each (decode, check, prepare); errors name the image."""
    jobs = []
    for i, request in enumerate(requests):
        try:
            jobs.append(model.begin(request))
        except VisionServeError as exc:
            raise type(exc)(f"image {i} of {len(requests)}: {exc}") from exc
    return jobs


async def _run(
    model: ServedModel, jobs: list[Job], deadline: float | None, executor: Executor | None
) -> list[Result]:
    """Submit every job (they batch together), then ``ServedModel.finish`` each."""
    loop = asyncio.get_running_loop()
    futures = [model.submit_job(job, deadline) for job in jobs]
    try:
        outputs = [await wait_async(future, deadline) for future in futures]
        return await loop.run_in_executor(
            executor, lambda: [model.finish(j, o) for j, o in zip(jobs, outputs, strict=True)]
        )
    finally:
        for future in futures:
            future.cancel()  # a no-op for those done; frees the batcher of the rest on failure


def _classes(results: list[Result], name: str) -> dict[str, np.ndarray]:
    """Classification results -> probabilities ``[N, C]`` (as ``name``), ``LABELS`` and
    ``SCORES`` ``[N, k]`` (``ServedModel.finish``'s top-k)."""
    rows = [r for r in results if isinstance(r, ClassifyResult)]
    return {
        name: np.stack([r.probabilities for r in rows]),
        LABELS: np.array([[label.encode() for _, label, _ in r.top] for r in rows], dtype=object),
        SCORES: np.array([[score for _, _, score in r.top] for r in rows], dtype=np.float32),
    }


def _masks(results: list[Result], stacked: bool) -> dict[str, np.ndarray]:
    """Segmentation results -> ``MASK`` ``[N, H, W]`` (when ``stacked``) and, with ground
    truth, ``INTERSECTION`` / ``UNION`` ``[N, C]`` (``iou.compute_iou``'s counts)."""
    rows = [r for r in results if isinstance(r, SegmentResult)]
    out = {MASK: np.stack([r.mask for r in rows])} if stacked else {}
    scores = [r.iou for r in rows if r.iou is not None]
    if scores:
        out[INTERSECTION] = np.array([s.intersection for s in scores], dtype=np.int64)
        out[UNION] = np.array([s.union for s in scores], dtype=np.int64)
    return out


def _check_same_size(images: list[np.ndarray]) -> None:
    sizes = [image.shape[:2] for image in images]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise InvalidArgument(
            f"output {MASK!r} is one UINT8 [N, H, W] tensor, but the images have different "
            f"sizes ({listed}, HxW): send one request per image, or images of one size (the "
            f"{INTERSECTION!r} / {UNION!r} outputs alone take any sizes)"
        )
