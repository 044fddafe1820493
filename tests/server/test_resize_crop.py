"""``input.mode: resize_crop``: torchvision's eval transforms (Resize(256) + CenterCrop(224),
bilinear, antialiased) in the server's preprocessing, checked at config load and against
torchvision itself (export extra)."""

from __future__ import annotations

import grpc
import make_models
import numpy as np
import pytest
from server_test_helpers import png
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.model_config import InputSpec, ModelConfig
from visionserve.server.preprocess import layout, preprocess
from visionserve.server.resample import CropBox, crop_box, resize_crop, taps

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
    ("hw", "resize_size", "crop", "expected"),
    [
        ((375, 500), 256, (224, 224), CropBox((256, 341), 16, 58, (224, 224))),
        ((500, 375), 256, (224, 224), CropBox((341, 256), 58, 16, (224, 224))),
        ((224, 224), 256, (224, 224), CropBox((256, 256), 16, 16, (224, 224))),
        ((10, 1000), 110, (96, 96), CropBox((110, 11000), 7, 5452, (96, 96))),
        ((257, 256), 256, (224, 224), CropBox((257, 256), 16, 16, (224, 224))),  # round(16.5)
    ],
)
def test_crop_box_follows_torchvision(hw, resize_size, crop, expected) -> None:
    assert crop_box(*hw, resize_size, crop) == expected


def test_crop_box_refuses_a_resize_smaller_than_the_crop() -> None:
    with pytest.raises(ValueError, match="at least the crop's larger side"):
        crop_box(100, 100, 200, (224, 224))


def test_taps_sum_to_one_and_widen_when_shrinking() -> None:
    index, weight = taps(1000, 100, 0, 100)
    np.testing.assert_allclose(weight.sum(axis=1), 1.0, rtol=1e-6)
    assert (weight > 0).sum(axis=1)[1:-1].min() == 20  # 2 x 10 input pixels per output pixel
    assert index.min() == 0 and index.max() == 999


def test_resize_crop_keeps_a_constant_image_and_crops_the_centre() -> None:
    flat = np.full((300, 400, 3), 77, np.uint8)
    np.testing.assert_allclose(resize_crop(flat, 256, (224, 224)), 77.0, atol=1e-3)
    image = np.zeros((256, 512, 3), np.uint8)
    image[:, 128:384] = 255  # the centre square is white, the sides black
    out = resize_crop(image, 256, (224, 224))
    assert out.shape == (224, 224, 3) and out.min() == pytest.approx(255.0, abs=1e-3)


def test_input_spec_defaults_resize_size_from_the_256_224_ratio() -> None:
    assert InputSpec(height=224, width=224, mode="resize_crop").resize_size == 256
    assert InputSpec(height=96, width=96, mode="resize_crop").resize_size == 110
    assert InputSpec(height=224, width=224, mode="resize_crop", resize_size=232).resize_size == 232


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "resize_crop", "resize_size": 200}, "at least the crop's larger side 224"),
        ({"mode": "resize", "resize_size": 256}, "used by input.mode 'resize_crop' only"),
        ({"mode": "crop"}, "input.mode must be one of"),
    ],
)
def test_input_spec_refuses_bad_resize_crop_settings(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InputSpec(height=224, width=224, **fields)


def test_model_yaml_round_trips_resize_crop_and_refuses_it_for_segmenters(tmp_path) -> None:
    spec = {"height": 224, "width": 224, "mode": "resize_crop", "resize_size": 256}
    base = {"name": "m", "labels": ["a", "b"], "input": spec}
    config = ModelConfig.from_dict(
        {**base, "task": "classification", "outputs": {"probabilities": "p"}}
    )
    config.save(tmp_path / "model.yaml")
    assert ModelConfig.load(tmp_path / "model.yaml").input == config.input
    assert "resize_size" not in ModelConfig.from_dict(
        {"name": "m", "labels": ["a", "b"], "task": "classification",
         "outputs": {"probabilities": "p"}}
    ).to_dict()["input"]
    with pytest.raises(ValueError, match="is for classifiers"):
        ModelConfig.from_dict({**base, "task": "segmentation", "outputs": {"mask": "mask"}})


def test_preprocess_in_resize_crop_mode_has_the_model_input_size() -> None:
    spec = InputSpec(height=32, width=48, mode="resize_crop", mean=MEAN, std=STD)
    image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    assert layout(90, 70, spec).tensor == (32, 48)
    assert preprocess(image, spec).shape == (3, 32, 48)


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (224, 224), (120, 160), (1200, 900)])
def test_preprocess_matches_torchvision_eval_transforms(hw: tuple[int, int]) -> None:
    """Against ``Resize(256) + CenterCrop(224) + ToTensor + Normalize`` on a PIL image.

    Tolerance: PIL rounds the resized pixels to uint8, the server keeps them in float32,
    so they differ by at most one grey level: 1/255 / std <= 0.0176 after normalising."""
    transforms = pytest.importorskip("torchvision.transforms", reason="needs the export extra")
    image_module = pytest.importorskip("PIL.Image", reason="needs Pillow (export extra)")
    rng = np.random.default_rng(hw[0])
    ramp = np.linspace(0, 120, hw[1], dtype=np.float32)[None, :, None]
    image = (rng.integers(0, 130, (*hw, 3)) + ramp).astype(np.uint8)
    reference = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )(image_module.fromarray(image)).numpy()
    spec = InputSpec(height=224, width=224, mode="resize_crop", resize_size=256, mean=MEAN, std=STD)
    ours = preprocess(image, spec)
    limit = 1.0 / 255.0 / min(STD) + 1e-5
    assert np.abs(ours - reference).max() <= limit
    assert np.abs(ours - reference).mean() < 0.5 / 255.0 / min(STD)


def test_a_resize_crop_classifier_is_served_on_the_centre_crop(start_server, tmp_path) -> None:
    """The tiny classifier averages its input: on an image whose centre is red and whose
    sides are blue, resize_crop sees only red, a plain resize sees both (blue wins)."""
    spec = {"name": "image", "mean": make_models.MEAN, "std": make_models.STD}
    make_models.write_entry(tmp_path, "cropped", "classification", input=InputSpec(
        height=32, width=32, mode="resize_crop", resize_size=36, **spec))
    make_models.write_entry(tmp_path, "stretched", "classification", input=InputSpec(
        height=32, width=32, **spec))
    image = np.zeros((64, 160, 3), np.uint8)
    image[:, :, 2] = 200  # blue everywhere ...
    image[:, 48:112] = (200, 0, 0)  # ... but a red centre square, 64 wide of 160
    server = start_server(repository=tmp_path)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        v1 = pb_grpc.VisionServiceStub(channel)
        request = pb.ClassifyRequest(image=pb.Image(encoded=png(image)), top_k=1)
        request.model = "cropped"
        assert v1.Classify(request, timeout=20).top[0].label == "red"
        request.model = "stretched"
        assert v1.Classify(request, timeout=20).top[0].label == "blue"
        config = kpb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            kpb.ModelConfigRequest(name="cropped"), timeout=10
        ).config
    assert config.parameters["input_mode"].string_value == "resize_crop"
    assert config.parameters["resize_size"].string_value == "36"
