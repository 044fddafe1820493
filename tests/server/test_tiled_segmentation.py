"""Images larger than every shape bucket: tiled at full resolution, stitched exactly.

The zoo's UNet and SegNet (random weights, ``make_models.zoo_segmenter_onnx``) run tiled
through ``ServedModel`` and whole on ONNX Runtime; with the margin from the receptive
field the masks agree (float near-ties aside), with margin 0 the seams show.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import replace
from pathlib import Path

import grpc
import make_models
import numpy as np
import pytest
from visionserve.clients import VisionClient, VisionServeError
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.backends.onnxruntime import OnnxRuntimeBackend
from visionserve.server.batcher import Batcher
from visionserve.server.model_config import InputSpec, ModelConfig, ReceptiveField, ShapeProfile
from visionserve.server.preprocess import preprocess
from visionserve.server.served_model import ServedModel, raw_request
from visionserve.server.tile_runner import TiledRun
from visionserve.server.tiling import tile_plan

ZOO_PROFILE = ShapeProfile(batch=(1, 4, 8), height=(32, 256, 512), width=(32, 256, 512))
TINY_PROFILE = ShapeProfile(batch=(1, 4, 8), height=(16, 32, 64), width=(16, 48, 64))
TINY_INPUT = InputSpec(name="image", height=32, width=48, mean=make_models.MEAN, std=make_models.STD,
                       mode="pad", buckets=(32, 48, 64), receptive_field=ReceptiveField(1, 0, 1))


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ReceptiveField]]:
    pytest.importorskip("torch", reason="building the zoo segmenters needs the export extra")
    from visionserve.export.receptive_field import receptive_field
    import onnx

    directory = tmp_path_factory.mktemp("zoo")
    models = {}
    for architecture in ("unet", "segnet"):
        proto = make_models.zoo_segmenter_onnx(architecture, base_channels=4)
        path = directory / f"{architecture}.onnx"
        onnx.save(proto, path)
        # read from the exported graph (SegNet: through the pooling rewrite), as export does
        models[architecture] = (path, receptive_field(proto))
    return models


def _served(path: Path, field: ReceptiveField, **spec: object) -> ServedModel:
    config = ModelConfig(
        name="zoo", task="segmentation", labels=make_models.LABELS,
        input=InputSpec(mode="pad", mean=make_models.MEAN, std=make_models.STD,
                        receptive_field=field, **spec),
        outputs={"mask": "mask"}, profile=ZOO_PROFILE, max_batch_size=4)
    backend = OnnxRuntimeBackend(path, name="onnxruntime-cpu", intra_op_threads=2)
    return ServedModel("zoo", 1, config, backend)


_WHOLE: dict[tuple[str, tuple[int, int]], np.ndarray] = {}


def _whole_image(path: Path, image: np.ndarray) -> np.ndarray:
    """The model on the whole image at once (ONNX Runtime on model.onnx), cached per test run."""
    import onnxruntime as ort

    key = (str(path), image.shape[:2])
    if key not in _WHOLE:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = InputSpec(height=image.shape[0], width=image.shape[1], mean=make_models.MEAN,
                         std=make_models.STD)
        _WHOLE[key] = session.run(["mask"], {"image": preprocess(image, spec)[None]})[0][0]
    return _WHOLE[key]


@pytest.mark.parametrize("architecture", ["unet", "segnet"])
@pytest.mark.parametrize("hw", [(1024, 1536), (2000, 3000)])
def test_tiled_mask_equals_whole_image_inference(zoo_models, architecture: str,
                                                 hw: tuple[int, int]) -> None:
    path, field = zoo_models[architecture]
    assert field == ReceptiveField(103, 51, 8)  # depth 3, by hand: the margin rounds 51 up to 56
    image = make_models.scene(np.random.default_rng(1), *hw)
    whole = _whole_image(path, image)
    model = _served(path, field)
    try:
        result = model.run(raw_request("segmentation", image))
    finally:
        model.close()
    mask, serving = result.mask, result.serving
    assert serving.mode == "tiled" and serving.tiles.margin == 56
    assert serving.tiles.count == {(1024, 1536): 12, (2000, 3000): 40}[hw]
    assert len(np.unique(whole)) >= 2  # the model does not answer one class everywhere
    assert (mask == whole).mean() >= 0.999


@pytest.mark.parametrize("architecture", ["unet", "segnet"])
def test_margin_zero_shows_the_seams(zoo_models, architecture: str) -> None:
    """Without the margin, tile edges differ from whole-image inference: the exactness test
    above would see seams."""
    path, field = zoo_models[architecture]
    image = make_models.scene(np.random.default_rng(1), 1024, 1536)
    whole = _whole_image(path, image)
    agreement = {}
    for margin in (None, 0):
        model = _served(path, field, tile_margin=margin)
        try:
            agreement[margin] = (model.run(raw_request("segmentation", image)).mask == whole).mean()
        finally:
            model.close()
    assert agreement[0] < agreement[None]
    assert agreement[0] < 1.0 - 1e-4  # hundreds of pixels along the seams


# -- the server, with the tiny per-pixel segmenter -----------------------------------------
@pytest.fixture
def tiny_repository(tmp_path: Path) -> Path:
    for name, spec in {"tiles": TINY_INPUT, "scales": replace(TINY_INPUT, oversized="scale"),
                       "rejects": replace(TINY_INPUT, oversized="reject"),
                       "few-tiles": replace(TINY_INPUT, max_tiles=4)}.items():
        make_models.write_entry(tmp_path, name, "segmentation", input=spec, profile=TINY_PROFILE)
    return tmp_path


def test_server_tiles_large_images_and_scores_iou_on_them(start_server, tiny_repository: Path) -> None:
    server = start_server(repository=tiny_repository)
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    truth = make_models.segmenter_reference(image)
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        result = client.segment(image, model="tiles", ground_truth=truth)
        small = client.segment(image[:40, :50], model="tiles")
        info = client.get_model("tiles")
    np.testing.assert_array_equal(result.mask, truth)
    assert result.iou.pixel_accuracy == 1.0 and result.iou.scored_pixels == 300 * 500
    assert result.serving.mode == "tiled" and result.serving.tiles == 5 * 8
    assert result.serving.description == "tiled: 40 tiles of 64x64, margin 0"
    assert (small.serving.mode, small.serving.bucket) == ("bucket", (48, 64))
    assert (info.receptive_field, info.receptive_field_radius, info.output_stride) == (1, 0, 1)
    assert (info.oversized, info.tile_size, info.tile_margin, info.max_tiles) == ("tile", 64, 0, 1024)


def test_streams_mixing_tiled_and_small_images_are_all_answered(start_server, tmp_path: Path) -> None:
    """Tiles of large images once shared the batcher's bound with whole requests: with
    streams sending both, small images' items were answered "queue full" in-band."""
    make_models.write_entry(tmp_path, "tiles", "segmentation", input=TINY_INPUT, profile=TINY_PROFILE,
                            max_queue_size=8)
    server = start_server(repository=tmp_path, workers=4)
    rng = np.random.default_rng(9)
    large, small = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)

    def request(image: np.ndarray, i: int) -> pb.SegmentRequest:
        raw = pb.RawImage(data=image.tobytes(), height=image.shape[0], width=image.shape[1], channels=3)
        return pb.SegmentRequest(model="tiles", image=pb.Image(raw=raw), request_id=str(i))

    async def main() -> list[str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.VisionServiceStub(channel)

            async def stream(s: int) -> list[str]:
                items = [request(large if (s + k) % 3 == 0 else small, k) for k in range(6)]
                replies = [reply async for reply in stub.SegmentStream(iter(items), timeout=60)]
                return [r.error_message or "OK" for r in replies]

            answers = await asyncio.gather(*(stream(s) for s in range(24)))
            return [a for stream_answers in answers for a in stream_answers]

    answers = asyncio.run(main())
    assert collections.Counter(answers) == {"OK": 24 * 6}


def test_policies_scale_reject_and_the_tile_limit(start_server, tiny_repository: Path) -> None:
    server = start_server(repository=tiny_repository)
    image = np.random.default_rng(8).integers(0, 256, (128, 256, 3), dtype=np.uint8)
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        scaled = client.segment(image, model="scales")
        assert scaled.mask.shape == (128, 256)
        assert (scaled.serving.mode, scaled.serving.scale, scaled.serving.scaled) == ("scaled", 0.25, True)
        with pytest.raises(VisionServeError) as rejected:
            client.segment(image, model="rejects")
        assert rejected.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "128x256" in str(rejected.value) and "at most 64x64" in str(rejected.value)
        with pytest.raises(VisionServeError) as too_many:
            client.segment(image, model="few-tiles")
        assert too_many.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "8 tiles of 64x64" in str(too_many.value) and "limit of 4" in str(too_many.value)
        ok = client.segment(image[:64, :64], model="few-tiles")  # the server goes on serving
        assert ok.serving.mode == "bucket"


# -- waves, deadline and cancellation (TiledRun over a real Batcher) -------------------------
class SlowModel:
    """A stand-in backend: each batch takes ``seconds``; counts rows run and rows in flight."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.rows, self.lock = seconds, 0, threading.Lock()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        with self.lock:
            self.rows += batch.shape[0]
        return {"mask": np.zeros((batch.shape[0], *batch.shape[2:]), np.uint8)}


def _run(batcher: Batcher, image: np.ndarray, wave: int, deadline: float | None = None) -> TiledRun:
    plan = tile_plan(*image.shape[:2], TINY_INPUT)
    return TiledRun(image, plan, submit=batcher.submit,
                    prepare=lambda tile: tile.transpose(2, 0, 1)[None].astype(np.float32),
                    tile_mask=lambda outputs: outputs["mask"][0], output="mask",
                    deadline=deadline, wave=wave)


def test_tiles_go_in_waves_and_a_cancelled_request_drops_the_rest() -> None:
    slow = SlowModel(0.02)
    batcher = Batcher("slow", slow, max_batch_size=2, max_queue_delay_s=0.0, queue_size=64)
    image = np.zeros((640, 640, 3), np.uint8)  # 100 tiles of 64x64
    try:
        run = _run(batcher, image, wave=4)
        assert run.submitted == 4 and batcher.depth() <= 4  # one wave, not 100 tiles
        time.sleep(0.1)
        assert run.future.cancel()
        time.sleep(0.1)
        ran = slow.rows
        time.sleep(0.1)
        assert slow.rows == ran < 20  # nothing more runs after the cancel
        with pytest.raises(CancelledError):
            run.future.result(0)
    finally:
        batcher.close()


def test_the_deadline_covers_every_tile() -> None:
    slow = SlowModel(0.02)
    batcher = Batcher("slow", slow, max_batch_size=2, max_queue_delay_s=0.0, queue_size=64)
    try:
        run = _run(batcher, np.zeros((640, 640, 3), np.uint8), wave=4, deadline=time.monotonic() + 0.15)
        with pytest.raises(Exception) as error:
            run.future.result(5)
        assert type(error.value).__name__ == "DeadlineExceeded"
        assert slow.rows < 100
    finally:
        batcher.close()


def test_small_requests_are_not_blocked_behind_a_tiled_image() -> None:
    slow = SlowModel(0.02)
    batcher = Batcher("slow", slow, max_batch_size=2, max_queue_delay_s=0.0, queue_size=64)
    try:
        run = _run(batcher, np.zeros((640, 640, 3), np.uint8), wave=4)
        started = time.monotonic()
        batcher.submit(np.zeros((1, 3, 32, 32), np.float32)).result(5)
        assert time.monotonic() - started < 0.5  # 100 tiles take >= 1 s
        assert not run.future.done()
        assert run.future.result(10)["mask"].shape == (1, 640, 640)
    finally:
        batcher.close()


def test_kserve_model_metadata_states_sizes_and_tiling(start_server, tiny_repository: Path) -> None:
    from visionserve.protos import grpc_service_pb2 as kpb
    from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc

    server = start_server(repository=tiny_repository, max_decoded_pixels=5_000_000)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        meta = kpb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            kpb.ModelMetadataRequest(name="tiles"))
    params = {k: v.WhichOneof("parameter_choice") and getattr(v, v.WhichOneof("parameter_choice"))
              for k, v in meta.parameters.items()}
    assert params == {
        "input_mode": "pad", "min_size": 16, "max_size": 64, "max_image_pixels": 5_000_000,
        "receptive_field": 1, "receptive_field_radius": 0, "output_stride": 1,
        "largest_bucket": 64, "oversized": "tile", "tile_size": 64, "tile_margin": 0,
        "max_tiles": 1024,
    }


def test_segment_cli_reports_size_and_how_each_image_was_served(
    start_server, tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv
    import json

    import cv2
    from visionserve.cli import main

    server = start_server(repository=tiny_repository)
    rng = np.random.default_rng(9)
    images, gts = tmp_path / "images", tmp_path / "gts"
    images.mkdir()
    gts.mkdir()
    for name, hw in {"big": (200, 300), "small": (40, 50)}.items():
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        cv2.imwrite(str(images / f"{name}.png"), image[..., ::-1])
        cv2.imwrite(str(gts / f"{name}.png"), make_models.segmenter_reference(image))
    for model in ("tiles", "scales"):
        out = tmp_path / model
        code = main(["segment", str(images), "--server", f"127.0.0.1:{server.port}", "--model", model,
                     "--gt", str(gts), "--out", str(out), "--no-progress", "--overlays"])
        assert code == 0
        rows = {r["image"]: r for r in csv.DictReader((out / "report_images.csv").open())}
        assert (rows["big.png"]["height"], rows["big.png"]["width"]) == ("200", "300")
        mask = cv2.imread(str(out / "masks/big.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (200, 300)  # masks are never downscaled
        served = json.loads((out / "report.json").read_text())["served"]
        err = capsys.readouterr().err
        if model == "tiles":
            assert rows["big.png"]["served"] == "tiled: 20 tiles of 64x64, margin 0"
            assert rows["small.png"]["served"] == "bucket 48x64"
            assert served["modes"] == {"tiled": 1, "bucket": 1} and served["scaled_images"] == []
            assert "scaled down" not in err
        else:
            assert rows["big.png"]["served"].startswith("scaled by 0.213")
            assert served["scaled_images"] == ["big.png"]
            assert "warning: the server scaled down 1 image(s)" in err and "big.png" in err


def test_overlays_of_huge_images_are_downscaled_masks_never() -> None:
    from visionserve.clients._render import overlay_size

    image = np.zeros((5000, 8192, 3), np.uint8)
    mask = np.zeros((5000, 8192), np.uint8)
    small_image, small_mask = overlay_size(image, mask)
    assert small_image.shape == (2500, 4096, 3) and small_mask.shape == (2500, 4096)
    assert overlay_size(image[:100], mask[:100])[1].shape == (50, 4096)
    same = overlay_size(image[:100, :100], mask[:100, :100])
    assert same[1].shape == (100, 100)


def test_kserve_encoded_image_beyond_the_largest_bucket_is_tiled(start_server,
                                                                 tiny_repository: Path) -> None:
    import struct

    import cv2
    from visionserve.protos import grpc_service_pb2 as kpb
    from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc

    server = start_server(repository=tiny_repository)
    image = np.random.default_rng(10).integers(0, 256, (150, 260, 3), dtype=np.uint8)
    png = cv2.imencode(".png", image[..., ::-1])[1].tobytes()
    request = kpb.ModelInferRequest(model_name="tiles")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(png)) + png)
    request.outputs.add(name="MASK")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    out = response.outputs[0]
    mask = np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(out.shape)
    np.testing.assert_array_equal(mask[0], make_models.segmenter_reference(image))
