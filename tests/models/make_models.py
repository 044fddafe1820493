"""Tiny deterministic ONNX models for the server tests, built with onnx.helper only.

Both models "see colour": in normalized space (mean = std = 0.5, so x = 2p/255 - 1),
class c in 0..2 scores the R, G or B channel, and class 3 ("dark") scores a constant
-0.5, so it wins where every channel is below 64. The numpy references below
compute the same thing independently, so tests can predict outputs exactly.

    python tests/models/make_models.py OUT_DIR   # write a model repository to OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from visionserve.server.model_config import InputSpec, ModelConfig

LABELS = ("red", "green", "blue", "dark")
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
CLASSIFIER = "tiny-classifier"
SEGMENTER = "tiny-segmenter"
CLASSIFIER_HW = (32, 32)
SEGMENTER_HW = (32, 48)  # non-square on purpose
OPSET = 17

# class scores = WEIGHTS @ x + BIAS (x: normalized RGB)
WEIGHTS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=np.float32)
BIAS = np.array([0, 0, 0, -0.5], dtype=np.float32)
CLASSIFIER_GAIN = 4.0  # sharper softmax


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="make_models"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def classifier_onnx() -> onnx.ModelProto:
    """image [N,3,H,W] -> GlobalAveragePool -> Flatten -> Gemm -> logits -> Softmax -> probabilities."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(LABELS)])
    inits = [
        numpy_helper.from_array(WEIGHTS * CLASSIFIER_GAIN, "fc_w"),
        numpy_helper.from_array(BIAS * CLASSIFIER_GAIN, "fc_b"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return _model(helper.make_graph(nodes, "tiny_classifier", [image], [logits, probs], inits))


def segmenter_onnx(faulty: bool = False) -> onnx.ModelProto:
    """image [N,3,H,W] -> 1x1 Conv (4 classes) -> ArgMax(axis 1) -> Cast uint8 -> mask [N,H,W].

    ``faulty``: a fifth, undeclared class wins on near-white pixels (but not on the
    mid-gray warm-up image), so the server sees a class value out of range.
    """
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    mask = helper.make_tensor_value_info("mask", TensorProto.UINT8, ["N", "H", "W"])
    weights, bias = WEIGHTS, BIAS
    if faulty:
        weights = np.vstack([WEIGHTS, np.full((1, 3), 2, np.float32)])
        bias = np.append(BIAS, np.float32(-4.0)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weights.reshape(len(weights), 3, 1, 1), "conv_w"),
        numpy_helper.from_array(bias, "conv_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["scores"], kernel_shape=[1, 1]),
        helper.make_node("ArgMax", ["scores"], ["classes"], axis=1, keepdims=0),
        helper.make_node("Cast", ["classes"], ["mask"], to=TensorProto.UINT8),
    ]
    return _model(helper.make_graph(nodes, "tiny_segmenter", [image], [mask], inits))


def _scores(rgb: np.ndarray) -> np.ndarray:
    x = (rgb.astype(np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    return x @ WEIGHTS.T.astype(np.float64) + BIAS


def segmenter_reference(image: np.ndarray) -> np.ndarray:
    """The tiny segmenter's class per pixel of an RGB uint8 HxWx3 image, at its own size."""
    return np.argmax(_scores(image), axis=-1).astype(np.uint8)


def classifier_reference(image: np.ndarray) -> np.ndarray:
    """The tiny classifier's probabilities for an RGB image (exact for uniform images)."""
    logits = _scores(image.reshape(-1, 3).mean(axis=0)) * CLASSIFIER_GAIN
    e = np.exp(logits - logits.max())
    return e / e.sum()


def block_image(
    rng: np.random.Generator, grid: tuple[int, int] = SEGMENTER_HW, block: tuple[int, int] = (2, 3)
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image of ``grid`` uniform blocks of ``block`` pixels, and its class per block.

    Each block's colour has a clear class (one channel >= 160 and the others < 100, or
    every channel < 50 for "dark"), so resizing by whole blocks cannot change it.
    """
    classes = rng.integers(0, len(LABELS), size=grid)
    colours = rng.integers(0, 100, size=(*grid, 3))
    for c in range(3):
        colours[..., c] = np.where(classes == c, rng.integers(160, 256, size=grid), colours[..., c])
    colours = np.where((classes == 3)[..., None], rng.integers(0, 50, size=(*grid, 3)), colours)
    image = np.repeat(np.repeat(colours.astype(np.uint8), block[0], axis=0), block[1], axis=1)
    return image, classes.astype(np.uint8)


def write_entry(
    repo: Path,
    name: str,
    task: str,
    versions: tuple[int, ...] = (1,),
    model: onnx.ModelProto | None = None,
    **overrides: object,
) -> Path:
    """REPO/<name>/model.yaml + REPO/<name>/<v>/model.onnx for each version; returns the model dir.

    ``model`` defaults to the tiny model of ``task``; ``overrides`` replace ModelConfig fields.
    """
    if task == "classification":
        hw, outputs, default = (
            CLASSIFIER_HW,
            {"logits": "logits", "probabilities": "probabilities"},
            classifier_onnx,
        )
    else:
        hw, outputs, default = SEGMENTER_HW, {"mask": "mask"}, segmenter_onnx
    model = model if model is not None else default()
    fields = {
        "name": name,
        "task": task,
        "labels": LABELS,
        "input": InputSpec(name="image", height=hw[0], width=hw[1], mean=MEAN, std=STD),
        "outputs": outputs,
        "max_batch_size": 4,
    }
    fields.update(overrides)
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    ModelConfig(**fields).save(model_dir / "model.yaml")
    for version in versions:
        (model_dir / str(version)).mkdir(exist_ok=True)
        onnx.save(model, model_dir / str(version) / "model.onnx")
    return model_dir


def zoo_segmenter_onnx(architecture: str, *, base_channels: int = 8, depth: int = 3,
                       seed: int = 0) -> onnx.ModelProto:
    """The zoo's ``unet`` or ``segnet`` (4 classes) exported as ``visionserve export`` does,
    with random weights and random BatchNorm statistics, so that its mask varies over an
    image (needs torch: the export extra)."""
    import torch

    from visionserve.export.models import build_model, randomise_batchnorm
    from visionserve.export.onnx_export import check_onnx, onnx_from_module, size_multiple_of

    torch.manual_seed(seed)
    model = randomise_batchnorm(build_model(architecture, num_classes=len(LABELS),
                                            base_channels=base_channels, depth=depth))
    _centre_head(model.eval(), torch.from_numpy(
        scene(np.random.default_rng(seed), 256, 256).transpose(2, 0, 1)[None] / 127.5 - 1.0).float())
    return check_onnx(onnx_from_module(model.eval(), "segmentation", height=64, width=64,
                                       size_multiple=size_multiple_of(model)))


def _centre_head(model: object, sample: object) -> None:
    """Set the 1x1 head's bias to cancel its response to the mean feature of ``sample``, so
    that each class wins somewhere (random weights otherwise let one class win everywhere)."""
    import torch

    seen = []
    hook = model.head.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(sample)
        hook.remove()
        mean = seen[0].mean(dim=(0, 2, 3))
        model.head.bias.copy_(-model.head.weight[:, :, 0, 0] @ mean)


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image of coloured rectangles and discs on a noisy background."""
    import cv2

    image = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    for _ in range(max(4, height * width // 40_000)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        size = int(rng.integers(8, 120))
        if rng.random() < 0.5:
            cv2.rectangle(image, (x, y), (x + size, y + size // 2), colour, -1)
        else:
            cv2.circle(image, (x, y), size // 2, colour, -1)
    return image


def write_repository(repo: Path) -> Path:
    """The test repository: tiny-classifier (versions 1, 2) and tiny-segmenter (version 1)."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    write_entry(repo, CLASSIFIER, "classification", versions=(1, 2))
    write_entry(repo, SEGMENTER, "segmentation")
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the model repository into")
    write_repository(parser.parse_args().out)


if __name__ == "__main__":
    main()
