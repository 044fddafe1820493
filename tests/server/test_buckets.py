"""Shape buckets: segmenters with a dynamic H, W served at the image's own resolution,
padded up to a bucket (so nearby sizes batch together) and cropped back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import make_models
import numpy as np
import pytest
from visionserve.clients import VisionClient
from visionserve.server.model_config import InputSpec, ModelConfig, ShapeProfile, bucket_ladder
from visionserve.server.preprocess import Layout, layout, preprocess
from visionserve.server.repository import ModelRepository
from visionserve.server.backends.registry import load_backend
from visionserve.server.served_model import ServedModel, raw_request

BUCKETS = (32, 48, 64)
PROFILE = ShapeProfile(batch=(1, 4, 8), height=(16, 32, 64), width=(16, 48, 64))
PAD = InputSpec(
    name="image",
    height=32,
    width=48,
    mean=make_models.MEAN,
    std=make_models.STD,
    mode="pad",
    buckets=BUCKETS,
)


def test_bucket_ladder_doubles_with_halfway_steps_inside_the_range() -> None:
    assert bucket_ladder(32, 512) == (32, 48, 64, 96, 128, 192, 256, 384, 512)
    assert bucket_ladder(40, 100) == (40, 48, 64, 96, 100)
    assert bucket_ladder(7, 7) == (7,)
    with pytest.raises(ValueError):
        bucket_ladder(10, 5)


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((20, 20), Layout((20, 20), (32, 32))),  # below the smallest bucket
        ((32, 48), Layout((32, 48), (32, 48))),  # exactly a bucket
        ((33, 47), Layout((33, 47), (48, 48))),  # each side rounds up on its own
        ((64, 10), Layout((64, 10), (64, 32))),
        ((128, 64), Layout((64, 32), (64, 32))),  # too large: scaled down, aspect kept
        ((300, 200), Layout((64, 43), (64, 48))),
        ((1, 1000), Layout((1, 64), (32, 64))),  # never a side of 0
    ],
)
def test_layout_pads_to_the_next_bucket_and_scales_down_only_beyond_the_largest(
    hw: tuple[int, int], expected: Layout
) -> None:
    assert layout(*hw, PAD) == expected


def test_layout_in_resize_mode_is_the_model_input() -> None:
    spec = InputSpec(height=8, width=16)
    assert layout(500, 3, spec) == Layout((8, 16), (8, 16))


def test_preprocess_pads_by_repeating_the_edge_and_keeps_the_image_unscaled() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 37, 3), dtype=np.uint8)
    x = preprocess(image, PAD)
    assert x.shape == (3, 32, 48)
    exact = preprocess(image, InputSpec(height=20, width=37, mean=PAD.mean, std=PAD.std))
    np.testing.assert_array_equal(x[:, :20, :37], exact)
    np.testing.assert_array_equal(x[:, 20:, :37], np.repeat(exact[:, -1:, :], 12, axis=1))
    np.testing.assert_array_equal(x[:, :, 37:], np.repeat(x[:, :, 36:37], 11, axis=2))


def config(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = {
        "name": "seg",
        "task": "segmentation",
        "labels": make_models.LABELS,
        "input": PAD,
        "outputs": {"mask": "mask"},
        "profile": PROFILE,
        "max_batch_size": 4,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def test_pad_mode_needs_a_dynamic_height_and_width() -> None:
    with pytest.raises(ValueError, match="dynamic height and width"):
        config(profile=ShapeProfile(batch=(1, 4, 8)))


def test_buckets_must_lie_inside_the_profile() -> None:
    with pytest.raises(ValueError, match=r"\[128\] lie outside .* 16\.\.64"):
        config(input=InputSpec(mode="pad", buckets=(32, 128)))
    with pytest.raises(ValueError, match="increasing order"):
        InputSpec(mode="pad", buckets=(48, 32))
    with pytest.raises(ValueError, match="input.mode"):
        InputSpec(mode="crop")


def test_buckets_default_to_the_ladder_over_the_profile_and_survive_model_yaml(
    tmp_path: Path,
) -> None:
    derived = config(input=InputSpec(mode="pad"))
    assert derived.input.buckets == (16, 24, 32, 48, 64)
    derived.save(tmp_path / "model.yaml")
    loaded = ModelConfig.load(tmp_path / "model.yaml")
    assert loaded == derived and loaded.input.mode == "pad"


@pytest.fixture
def pad_repository(tmp_path: Path) -> Path:
    make_models.write_entry(
        tmp_path, "pad-segmenter", "segmentation", input=PAD, profile=PROFILE, max_batch_size=4
    )
    return tmp_path


@pytest.mark.parametrize("hw", [(17, 23), (32, 48), (40, 61), (64, 64), (9, 50)])
def test_served_masks_are_the_model_at_the_image_resolution(
    start_server, pad_repository: Path, hw: tuple[int, int]
) -> None:
    """The tiny segmenter is per pixel: unresized, its mask is exact on any image."""
    server = start_server(repository=pad_repository)
    image = np.random.default_rng(hw[0] * hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        result = client.segment(image, model="pad-segmenter")
    np.testing.assert_array_equal(result.mask, make_models.segmenter_reference(image))


def test_an_image_beyond_the_largest_bucket_is_scaled_down_when_the_policy_says_scale(
    start_server, tmp_path: Path
) -> None:
    from dataclasses import replace

    make_models.write_entry(tmp_path, "scaling", "segmentation", profile=PROFILE,
                            input=replace(PAD, oversized="scale"))
    server = start_server(repository=tmp_path)
    image, classes = make_models.block_image(np.random.default_rng(3), (6, 8), block=(30, 30))
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        result = client.segment(image, model="scaling")
    assert result.mask.shape == (180, 240)
    assert result.serving.scaled and "scaled by 0.267" in result.serving.description
    expected = np.kron(classes, np.ones((30, 30), np.uint8))
    assert (result.mask == expected).mean() > 0.97  # only block edges may move by a pixel


def test_an_image_beyond_the_largest_bucket_is_tiled_by_default(
    start_server, pad_repository: Path
) -> None:
    server = start_server(repository=pad_repository)
    image = np.random.default_rng(4).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        result = client.segment(image, model="pad-segmenter")
    np.testing.assert_array_equal(result.mask, make_models.segmenter_reference(image))
    assert result.serving.mode == "tiled" and not result.serving.scaled


class RecordingBackend:
    """The real ONNX Runtime backend, recording the shape of every batch it runs."""

    def __init__(self, backend) -> None:  # type: ignore[no-untyped-def]
        self._backend = backend
        self.name, self.inputs, self.outputs = backend.name, backend.inputs, backend.outputs
        self.device = backend.device
        self.shapes: list[tuple[int, ...]] = []
        self.gate = threading.Event()  # the first batch waits for it: the model is busy
        self.gate.set()

    def infer(self, feeds):  # type: ignore[no-untyped-def]
        self.shapes.append(next(iter(feeds.values())).shape)
        self.gate.wait(10)
        return self._backend.infer(feeds)

    def close(self) -> None:
        self._backend.close()


def test_images_of_different_sizes_in_one_bucket_run_as_one_batch(pad_repository: Path) -> None:
    entry = ModelRepository(pad_repository).entry("pad-segmenter")
    backend = RecordingBackend(load_backend(entry, 1))
    cfg = entry.config
    model = ServedModel("pad-segmenter", 1, replace_delay(cfg, 500.0), backend)
    sizes = [(33, 40), (48, 48), (40, 33), (47, 35)]  # all in the 48x48 bucket
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes]
    masks: list[np.ndarray | None] = [None] * len(images)

    def run(i: int) -> None:
        masks[i] = model.run(raw_request("segmentation", images[i])).mask

    backend.gate.clear()  # a first request keeps the model busy while the others queue
    busy = model.submit(model.prepare(np.zeros((64, 64, 3), np.uint8)))
    deadline = time.monotonic() + 20
    while not backend.shapes and time.monotonic() < deadline:
        time.sleep(0.005)  # the busy request is in the backend: the model is not idle
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    while model._batcher.depth() < len(images) and time.monotonic() < deadline:
        time.sleep(0.01)  # every request decoded and queued behind the busy one
    backend.gate.set()
    for thread in threads:
        thread.join(30)
    busy.result(10)
    model.close()
    assert backend.shapes == [(1, 3, 64, 64), (4, 3, 48, 48)]
    for image, mask in zip(images, masks, strict=True):
        np.testing.assert_array_equal(mask, make_models.segmenter_reference(image))


def replace_delay(cfg: ModelConfig, delay_ms: float) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, max_queue_delay_ms=delay_ms)


def test_get_model_tells_the_input_mode_and_buckets(start_server, pad_repository: Path) -> None:
    server = start_server(repository=pad_repository)
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        info = client.get_model("pad-segmenter")
    assert (info.input_mode, list(info.buckets)) == ("pad", list(BUCKETS))
