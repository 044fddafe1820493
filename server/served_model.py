"""A loaded model version: config + backend + dynamic batcher, and a request's walk.

``ServedModel`` owns what happens to a request once a servicer has translated it
(``requests.SegmentInput`` / ``ClassifyInput``)::

    job = model.begin(request)            # decode, check, plan, preprocess (CPU, off the loop)
    future = model.submit_job(job, deadline)   # the dynamic batcher (its own threads);
                                          # an image beyond the largest bucket as tiles
    result = model.finish(job, outputs)   # mask to size, encode, IoU / top-k (CPU)

``run(request, deadline)`` does all three in the caller's thread (offline path,
synchronous callers); ``await run_async(request, deadline, executor)`` from a coroutine
(begin/finish in the executor, never on the event loop), and ``serve`` the same behind
admission control (what the servicers call). ``infer`` takes the model's input tensor (KServe tensors).
``enter``/``exit`` count requests in flight so that ``retire`` (unload, or a version
swapped out) lets them finish first. ``registry.ModelRegistry`` holds every version.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np
from visionserve.server.admission import Admission, AdmissionPolicy
from visionserve.server.backends.base import Backend
from visionserve.server.batcher import Batcher, BatchObserver
from visionserve.server.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
)
from visionserve.server.iou import compute_iou
from visionserve.server.model_config import ModelConfig
from visionserve.server.postprocess import mask_to_image, top_k
from visionserve.server.preprocess import layout, preprocess
from visionserve.server.requests import (
    ClassifyInput,
    ClassifyResult,
    ImageData,
    RequestLimits,
    SegmentInput,
    SegmentResult,
    decode_image,
    decode_truth,
    encode_mask,
)
from visionserve.server.statistics import InferenceStatistics, Observers
from visionserve.server.tile_runner import TiledRun
from visionserve.server.tiling import Serving, plan_image

log = logging.getLogger(__name__)

Request = SegmentInput | ClassifyInput
Result = SegmentResult | ClassifyResult


@dataclass(frozen=True)
class Job:
    """A request decoded and prepared by ``ServedModel.begin``, ready to ``submit``."""

    request: Request
    image: np.ndarray  # RGB uint8 HxWx3
    truth: np.ndarray | None  # uint8 HxW, the image's size
    ignore_index: int
    tensor: np.ndarray | None  # the model's input, one row (None: tiled, cut when submitted)
    serving: Serving | None = None  # segmentation: how the image is served


def raw_request(task: str, image: np.ndarray) -> Request:
    """A request for ``task`` carrying a decoded RGB ``image`` as raw bytes (warm-up, tests)."""
    height, width, channels = image.shape
    data = ImageData(np.ascontiguousarray(image).tobytes(), True, height, width, channels)
    return ClassifyInput(data) if task == "classification" else SegmentInput(data)


class ServedModel:
    """One model version ready to run requests, batched by its own ``Batcher``."""

    def __init__(
        self,
        name: str,
        version: int,
        config: ModelConfig,
        backend: Backend,
        *,
        observer: BatchObserver | None = None,
        source: object = None,
        limits: RequestLimits = RequestLimits(),
        admission: AdmissionPolicy = AdmissionPolicy(),
        inference_nice: int = 0,
    ) -> None:
        """``inference_nice``: a model on the CPU runs its batches that many priority
        steps below the server's other threads (``Batcher``'s ``nice``)."""
        self.name = name
        self.version = version
        self.config = config
        self.backend = backend
        self.source = source  # what it was loaded from (the repository's change signature)
        self.limits = limits
        inputs = {spec.name for spec in backend.inputs}
        outputs = {spec.name for spec in backend.outputs}
        if config.input.name not in inputs:
            raise ValueError(
                f"{name} v{version}: model.yaml input {config.input.name!r} is not a model input {sorted(inputs)}"
            )
        missing = sorted(set(config.outputs.values()) - outputs)
        if missing:
            raise ValueError(
                f"{name} v{version}: model.yaml outputs {missing} are not model outputs {sorted(outputs)}"
            )
        self.statistics = InferenceStatistics()  # KServe ModelStatistics
        self._batcher = Batcher(
            f"{name} v{version}",
            self._infer_batch,
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
            queue_size=config.max_queue_size,
            instances=config.instances,
            observer=Observers(self.statistics, observer),
            nice=inference_nice if inference_nice and backend.device == "cpu" else 0,
        )
        self.admission = Admission(
            f"{name} v{version}",
            admission,
            instances=config.instances,
            max_batch_size=config.max_batch_size,
            max_queue_size=config.max_queue_size,
            observer=observer,
        )
        self._in_flight = 0
        self._idle = threading.Condition()

    @property
    def task(self) -> str:
        return self.config.task

    def require_task(self, task: str, rpc: str) -> None:
        """``InvalidArgument`` when this model does another task than ``rpc`` needs."""
        if self.task != task:
            raise InvalidArgument(
                f"{rpc} needs a {task} model, but {self.name!r} is a {self.task} model"
            )

    # -- a request's walk: begin -> submit -> finish ------------------------------------
    def begin(self, request: Request) -> Job:
        """Decode and check the request's image (and ground truth), build its tensor.

        CPU work: the caller runs it off the event loop. ``InvalidArgument`` for a
        request of another task, or an input that fails its checks.
        """
        limit = self.limits.max_decoded_pixels
        if isinstance(request, SegmentInput):
            self.require_task("segmentation", "Segment")
        else:
            self.require_task("classification", "Classify")
        image = decode_image(request.image, limit)
        truth, ignore_index = None, self.config.ignore_index
        if isinstance(request, SegmentInput) and request.truth is not None:
            if request.ignore_index is not None:
                ignore_index = request.ignore_index
            truth = decode_truth(request.truth, image.shape[:2], limit)
        if isinstance(request, ClassifyInput):
            return Job(request, image, truth, ignore_index, self.prepare(image))
        serving = self.plan(image)
        tensor = None if serving.tiles is not None else self.prepare(image)
        return Job(request, image, truth, ignore_index, tensor, serving)

    def plan(self, image: np.ndarray) -> Serving:
        """How this model serves ``image`` (``tiling.plan_image``; ``ResourceExhausted`` when
        the policy is ``reject`` or the tiles would exceed ``max_tiles``)."""
        spec, (height, width) = self.config.input, image.shape[:2]
        if spec.mode != "pad":
            return Serving("resized", height, width, (spec.height, spec.width),
                           min(spec.height / height, spec.width / width))
        return plan_image(height, width, spec)

    def submit_job(self, job: Job, deadline: float | None = None, *, inline: bool = False) -> Future:
        """Submit a begun job; the future gives the outputs ``finish`` takes. A tiled job
        goes through the batcher as tiles (``TiledRun``), its future gives the stitched mask."""
        if job.tensor is not None:
            return self.submit(job.tensor, deadline, inline=inline)
        plan = job.serving.tiles
        side = plan.tile
        tensor = layout(side, side, self.config.input).tensor  # a tile, padded to its bucket
        run = TiledRun(
            job.image,
            plan,
            submit=functools.partial(self.submit, tile=True),
            prepare=self.prepare,
            tile_mask=lambda outputs: self._checked_mask(outputs, tensor)[:side, :side],
            output=self.config.outputs["mask"],
            deadline=deadline,
            wave=2 * self.config.max_batch_size * self.config.instances,
        )
        return run.future

    def submit(
        self,
        tensor: np.ndarray,
        deadline: float | None = None,
        *,
        inline: bool = False,
        tile: bool = False,
    ) -> Future:
        """Queue an input tensor ``[rows, C, H, W]``; the future gives every output.

        ``inline=True``: the caller waits for it at once, so it may run in the caller's
        thread when the model is idle (``Batcher.submit``). ``tile=True``: a tile of a
        tiled image (its own queue bound; a tile refused is submitted again later, so
        it is not counted as shed).
        """
        try:
            return self._batcher.submit(tensor, deadline, inline=inline, tile=tile)
        except ResourceExhausted:
            if not tile:
                self.admission.shed("queue")
            raise

    def finish(self, job: Job, outputs: dict[str, np.ndarray]) -> Result:
        """The batch's outputs for ``job`` -> its result (mask at the image's size,
        encoded, IoU when truth was given; or probabilities and top-k). CPU work."""
        request = job.request
        if isinstance(request, ClassifyInput):
            return self._finish_classify(request, outputs)
        mask = self.finish_mask(outputs, job.image, job.serving)
        iou = None
        if job.truth is not None:
            iou = compute_iou(mask, job.truth, self.config.num_classes, job.ignore_index)
        encoded = encode_mask(mask, request.mask_format)
        return SegmentResult(mask, encoded, request.mask_format, iou, job.ignore_index, job.serving)

    def run(self, request: Request, deadline: float | None = None) -> Result:
        """The whole walk in the caller's thread (offline use, synchronous servers)."""
        job = self.begin(request)
        return self.finish(job, wait_for(self.submit_job(job, deadline, inline=True), deadline))

    async def serve(
        self,
        request: Request,
        deadline: float | None,
        executor: Executor | None = None,
        *,
        wait: bool = False,
        key: object = None,
    ) -> Result:
        """``run_async`` admitted first (``admission.Admission``): refused at once when
        the model is full or the deadline cannot be met, or, with ``wait``, queued for a
        slot, taking turns with other streams (``key``: the stream). What the servicers
        call.

        A request alone on an idle model (the only one admitted, nothing queued or running)
        walks in one worker thread, inference included (``_walk_alone``): two thread
        switches instead of six, measured 0.7-1.0 ms instead of 1.0-3.7 ms for a tiny model
        on 2 cores. Any other request is batched."""
        await self._admit(deadline, wait, key)
        try:
            alone = self.admission.admitted == 1 and self._batcher.idle()
            return await self.run_async(request, deadline, executor, alone=alone)
        finally:
            self.admission.release()

    async def run_async(
        self,
        request: Request,
        deadline: float | None,
        executor: Executor | None = None,
        *,
        alone: bool = False,
    ) -> Result:
        """The whole walk from a coroutine: ``begin`` and ``finish`` in ``executor`` (the
        server's CPU pool), inference in the batcher's threads; the event loop only waits.
        ``alone``: try the walk in one worker thread first (``_walk_alone``)."""
        loop = asyncio.get_running_loop()
        future: Future | None = None
        if alone:
            job, future, result = await loop.run_in_executor(
                executor, self._walk_alone, request, deadline
            )
            if result is not None:
                return result
        else:
            job = await loop.run_in_executor(executor, self.begin, request)
        if future is None:
            future = self.submit_job(job, deadline)
        outputs = await wait_async(future, deadline)
        return await loop.run_in_executor(executor, self.finish, job, outputs)

    def _walk_alone(
        self, request: Request, deadline: float | None
    ) -> tuple[Job, Future | None, Result | None]:
        """``begin``; a one-tensor job then runs in this thread while the batcher is still
        idle and is finished here too (the result). Otherwise the job goes back to the event
        loop to be waited for there, never blocking this worker: with its pending future (the
        batcher was busy by then), or with none (tiles: the loop submits them as usual)."""
        job = self.begin(request)
        if job.tensor is None:
            return job, None, None
        future = self.submit(job.tensor, deadline, inline=True)
        if not future.done():
            return job, future, None
        return job, future, self.finish(job, future.result())

    async def infer_async(
        self, tensor: np.ndarray, deadline: float | None
    ) -> dict[str, np.ndarray]:
        """``infer`` from a coroutine, admitted like ``serve`` (KServe tensors)."""
        await self._admit(deadline, False)
        try:
            return await wait_async(self.submit(tensor, deadline), deadline)
        finally:
            self.admission.release()

    @contextlib.asynccontextmanager
    async def admitted(self, deadline: float | None, images: int = 1) -> AsyncIterator[None]:
        """Hold an admission slot per image for a request that runs its own walk (refused
        at once, like ``serve``, when the model is full or the deadline cannot be met)."""
        self.admission.try_admit(deadline, images)
        try:
            yield
        finally:
            self.admission.release(images)

    async def _admit(self, deadline: float | None, wait: bool, key: object = None) -> None:
        if wait:
            await self.admission.admit(deadline, key)
        else:
            self.admission.try_admit(deadline)

    def infer(self, tensor: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Run an input tensor through the batcher and wait for its outputs (KServe tensors)."""
        return wait_for(self.submit(tensor, deadline, inline=True), deadline)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """A decoded RGB image -> the model's input tensor with one row."""
        return preprocess(image, self.config.input)[None]

    def _finish_classify(
        self, request: ClassifyInput, outputs: dict[str, np.ndarray]
    ) -> ClassifyResult:
        probabilities = outputs[self.config.outputs["probabilities"]]
        expected = (1, self.config.num_classes)
        if probabilities.shape != expected:
            raise BackendError(
                f"{self.name}: model returned probabilities {probabilities.shape}, expected {expected}"
            )
        row = probabilities[0].astype(np.float32, copy=False)
        k = min(request.top_k or self.limits.default_top_k, self.config.num_classes)
        labels = self.config.labels
        return ClassifyResult(row, [(i, labels[i], s) for i, s in top_k(row, k)])

    def finish_mask(
        self, outputs: dict[str, np.ndarray], image: np.ndarray, serving: Serving | None = None
    ) -> np.ndarray:
        """One request's outputs -> its uint8 mask at ``image``'s size (checked).

        The mask is cropped to where ``prepare`` put the image (pad mode) and resized
        back to the image's height x width; a tiled image's mask is stitched already
        (each tile checked as it came back).
        """
        if serving is not None and serving.tiles is not None:
            return outputs[self.config.outputs["mask"]][0]
        plan = layout(image.shape[0], image.shape[1], self.config.input)
        mask = self._checked_mask(outputs, plan.tensor)
        return mask_to_image(mask, plan.content, image.shape[0], image.shape[1])

    def _checked_mask(self, outputs: dict[str, np.ndarray], size: tuple[int, int]) -> np.ndarray:
        """The one-row mask output of a ``size`` (H, W) input as uint8 H x W, checked."""
        out = outputs[self.config.outputs["mask"]]
        if out.ndim == 4 and out.shape[1] == 1:
            out = out[:, 0]
        if out.shape != (1, *size):
            raise BackendError(
                f"{self.name}: model returned a mask of shape {out.shape}, "
                f"expected {(1, *size)}"
            )
        if out.size and (out.min() < 0 or out.max() >= self.config.num_classes):
            raise BackendError(
                f"{self.name}: model returned class values {int(out.min())}..{int(out.max())}, "
                f"expected 0..{self.config.num_classes - 1}"
            )
        return out[0].astype(np.uint8, copy=False)

    # -- lifecycle -----------------------------------------------------------------------
    def warmup(self) -> None:
        """Run batch 1 at each square shape bucket in pad mode, the largest first, then
        batch 1 and ``max_batch_size`` at the model's input size, then one request end
        to end.

        Largest first: ONNX Runtime's CPU memory arena, grown from small shapes up, left
        the demo UNet at 512x512 6 % slower for the rest of the process (75 vs 70 ms
        per image, one thread); sized by the largest shape first, it is not."""
        spec = self.config.input
        for side in sorted(spec.buckets, reverse=True) if spec.mode == "pad" else ():
            self._infer_batch(self.prepare(np.full((side, side, 3), 128, np.uint8)))
        image = np.full((spec.height, spec.width, 3), 128, np.uint8)
        tensor = self.prepare(image)
        for rows in sorted({1, self.config.max_batch_size}):
            self._infer_batch(np.repeat(tensor, rows, axis=0))
        self.run(raw_request(self.task, image))
        self.statistics.reset()

    def enter(self) -> None:
        """A request starts using this model (the registry calls it under its lock)."""
        with self._idle:
            self._in_flight += 1

    def exit(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def retire(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout``) for requests in flight to finish, then close.

        Returns False when requests were still in flight at the timeout.
        """
        with self._idle:
            drained = self._idle.wait_for(lambda: self._in_flight == 0, timeout)
        if not drained:
            log.warning("%s v%d: closing with requests still in flight", self.name, self.version)
        self.close()
        return drained

    def close(self) -> None:
        """Run what is queued, stop the batcher's workers, release the backend."""
        self._batcher.close()
        self.backend.close()

    def _infer_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            outputs = self.backend.infer({self.config.input.name: batch})
            self.admission.on_batch(int(batch.shape[0]), time.perf_counter() - start)
            return outputs
        except Exception as exc:
            raise BackendError(
                f"{self.name} v{self.version}: inference failed: {type(exc).__name__}: {exc}"
            ) from exc


def wait_for(future: Future, deadline: float | None) -> dict[str, np.ndarray]:
    """The future's result; ``DeadlineExceeded`` (and the request cancelled) at ``deadline``."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return future.result(timeout)
    except FutureTimeout:
        future.cancel()
        raise DeadlineExceeded(
            "the request's deadline passed while it waited for inference"
        ) from None


async def wait_async(future: Future, deadline: float | None) -> dict[str, np.ndarray]:
    """``wait_for`` for coroutines: the batcher's thread completes the asyncio future
    through ``loop.call_soon_threadsafe`` (``asyncio.wrap_future``); cancelling the
    coroutine cancels the request (dropped before it runs if still queued)."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        future.cancel()
        raise DeadlineExceeded(
            "the request's deadline passed while it waited for inference"
        ) from None
