"""How a request walks through a served model (real ONNX Runtime session, tiny model):
alone on an idle model it runs begin, inference and finish in one worker thread; with
company it is batched by the batcher's threads."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import make_models
import numpy as np
from visionserve.server.registry import load_model
from visionserve.server.repository import ModelRepository
from visionserve.server.requests import ClassifyInput, ClassifyResult, ImageData


def _requests(count: int) -> list[ClassifyInput]:
    rng = np.random.default_rng(0)
    return [ClassifyInput(ImageData(cv2.imencode(".png", rng.integers(0, 256, (32, 32, 3), np.uint8))[1]
                                    .tobytes()), 2) for _ in range(count)]


def _spied(model_repository: Path, **overrides: object):  # type: ignore[no-untyped-def]
    """The tiny classifier loaded as the server loads it, its backend's calls recorded
    (thread name, rows) and passed through."""
    entry = ModelRepository(model_repository).entry(make_models.CLASSIFIER)
    model = load_model(entry, overrides=overrides, warmup=False)
    calls: list[tuple[str, int]] = []
    infer = model.backend.infer

    def recorded(inputs):  # type: ignore[no-untyped-def]
        calls.append((threading.current_thread().name, int(next(iter(inputs.values())).shape[0])))
        return infer(inputs)

    model.backend.infer = recorded
    return model, calls


def test_a_lone_request_walks_in_one_worker_thread(model_repository: Path) -> None:
    model, calls = _spied(model_repository)
    expected = [model.run(request) for request in _requests(3)]  # the synchronous walk
    calls.clear()
    with ThreadPoolExecutor(2, thread_name_prefix="walk") as pool:
        async def one_by_one() -> list[ClassifyResult]:
            return [await model.serve(request, None, pool) for request in _requests(3)]

        results = asyncio.run(one_by_one())
    model.close()
    assert [r.top for r in results] == [r.top for r in expected]
    assert [name.startswith("walk") for name, _ in calls] == [True] * 3, calls
    assert model.admission.admitted == 0


def test_requests_with_company_are_batched(model_repository: Path) -> None:
    model, calls = _spied(model_repository, max_queue_delay_ms=50)
    requests = _requests(12)
    expected = [model.run(request).top for request in requests]
    calls.clear()
    with ThreadPoolExecutor(2, thread_name_prefix="walk") as pool:
        async def together() -> list[ClassifyResult]:
            return await asyncio.gather(*(model.serve(r, None, pool) for r in requests))

        results = asyncio.run(together())
    model.close()
    assert [r.top for r in results] == expected  # each answer is its own request's
    assert sum(rows for _, rows in calls) == 12
    batched = [rows for name, rows in calls if name.startswith("batcher")]
    assert batched and max(batched) > 1, calls  # the batcher gathered them
    assert sum(1 for name, _ in calls if name.startswith("walk")) <= 1, calls
