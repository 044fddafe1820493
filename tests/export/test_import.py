"""``visionserve import`` as a user would use it: ONNX files made with plain torch.onnx.export,
imported, served by a real server, answering like ONNX Runtime on the original file."""

from __future__ import annotations

import json
import stat
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from visionserve.clients import VisionClient
from visionserve.cli import main
from visionserve.export.onnx_import import ImportSpec, import_onnx
from visionserve.server.model_config import InputSpec, ModelConfig
from visionserve.server.preprocess import preprocess

from test_segnet import UserSegNet

LABELS = ("cat", "dog", "bird")


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class TinySegmenter(nn.Module):
    """Fully convolutional, any H, W."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(8, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _onnx_export(model: nn.Module, path: Path, size: tuple[int, int], *, spatial: bool,
                 output: str = "logits") -> Path:
    """What a user writes: plain torch.onnx.export with a dynamic batch (and H, W)."""
    torch.manual_seed(0)
    axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 3, *size),), str(path), input_names=["input"],
                          output_names=[output], dynamic_axes={"input": axes, output: axes})
    return path


def _images(count: int, height: int, width: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image[: height // 2] = rng.integers(0, 256, 3)  # flat regions too
        images.append(image)
    return images


def _original(path: Path, image: np.ndarray, spec: InputSpec) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"input": preprocess(image, spec)[None]})
    return scores[0]


def _config(repo: Path, name: str) -> ModelConfig:
    return ModelConfig.load(repo / name / "model.yaml")


def test_imported_classifier_is_served_like_the_original(tmp_path: Path, start_server) -> None:
    torch.manual_seed(0)
    path = _onnx_export(TinyClassifier(), tmp_path / "classifier.onnx", (64, 64), spatial=False)
    repo = tmp_path / "repo"
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    code = main(["import", str(path), "--repository", str(repo), "--name", "tiny-cls",
                 "--task", "classification", "--labels", str(tmp_path / "labels.txt")])
    assert code == 0
    config = _config(repo, "tiny-cls")
    # import cannot know how the model was trained: plain resize unless --input-mode resize_crop
    assert config.input.mode == "resize" and (config.input.height, config.input.width) == (64, 64)
    assert config.input.name == "input" and set(config.outputs) == {"logits", "probabilities"}
    for file in (repo / "tiny-cls" / "model.yaml", repo / "tiny-cls" / "1" / "model.onnx"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644
    validation = json.loads((repo / "tiny-cls" / "1" / "validation.json").read_text())
    assert validation["passed"] and validation["import"]["softmax_added"]
    server = start_server(repository=repo)
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        for image in _images(6, 80, 100):
            result = client.classify(image, model="tiny-cls", top_k=3)
            logits = _original(path, image, config.input)
            assert result.label == LABELS[int(logits.argmax())]
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            assert result.top[0].score == pytest.approx(float(probs.max()), abs=1e-4)


@pytest.mark.parametrize("model_kind", ["plain", "segnet"])
def test_imported_segmenter_is_served_like_the_original(tmp_path: Path, start_server,
                                                        model_kind: str) -> None:
    """Masks at sizes that need no padding agree >= 99 % with ONNX Runtime on the original;
    the user-written SegNet's MaxPool indices are rewritten on the way."""
    torch.manual_seed(0)
    model = TinySegmenter() if model_kind == "plain" else UserSegNet(classes=3)
    path = _onnx_export(model, tmp_path / "segmenter.onnx", (64, 64), spatial=True)
    repo = tmp_path / "repo"
    report = import_onnx(path, repo, "tiny-seg", ImportSpec(task="segmentation", labels=LABELS,
                                                          input_size=(64, 64)))
    assert report["passed"] and report["audit"]["ok"], report["audit"]["problems"]
    assert report["import"]["pooling_rewrites"] == (0 if model_kind == "plain" else 4)
    graph = onnx.load(str(repo / "tiny-seg" / "1" / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "MaxUnpool" or (n.op_type == "MaxPool" and
                                                                     len(n.output) > 1 and n.output[1])]
    config = _config(repo, "tiny-seg")
    serving = report["serving"]
    assert serving["measured"] and config.input.mode == serving["mode"]
    assert (serving["mode"] == "pad") == (serving["pad_mask_agreement"] >= serving["floor"])
    if model_kind == "plain":  # no pooling: padding only touches the border pixels
        assert serving["mode"] == "pad"
    # Sizes that need neither padding (bucket sizes) nor resizing (resize mode: the input size).
    sizes = ((64, 64), (96, 128)) if serving["mode"] == "pad" else ((64, 64),)
    server = start_server(repository=repo)
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        for height, width in sizes:
            for image in _images(2, height, width):
                mask = client.segment(image, model="tiny-seg").mask
                exact = InputSpec(height=height, width=width, mode="resize")
                reference = _original(path, image, exact).argmax(0)
                assert mask.shape == (height, width)
                assert (mask == reference).mean() >= 0.99


def _graph_file(path: Path, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
                nodes: list[onnx.NodeProto]) -> Path:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _image_input(name: str = "x", elem: int = TensorProto.FLOAT,
                 dims: tuple = ("n", 3, 8, 8)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(dims))


def _pooled_classifier(path: Path, classes: int, *, batch: int | str = "n", sigmoid: bool = False,
                       extra_output: bool = False) -> Path:
    """GlobalAveragePool -> (N, 3) -> MatMul to ``classes`` scores."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, classes],
                                np.linspace(-1, 1, 3 * classes).tolist())
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["s"])]
    out = "s"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["s"], ["sig"]))
        out = "sig"
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, classes])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [batch, 3]))
    graph = helper.make_graph(nodes, "g", [_image_input(dims=(batch, 3, 8, 8))], outputs, [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _import(path: Path, tmp_path: Path, capsys, *extra: str, labels: str = "a,b,c") -> tuple[int, str]:
    code = main(["import", str(path), "--repository", str(tmp_path / "repo"), "--name", "m",
                 "--task", "classification", "--labels", labels, "--no-tensorrt-check", *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: _graph_file(p, [_image_input(dims=("n", 8, 8, 3))], [_image_input("y", dims=("n", 8, 8, 3))],
                           [helper.make_node("Identity", ["x"], ["y"])]), "channels-last (NHWC)"),
    (lambda p: _graph_file(p, [_image_input(elem=TensorProto.UINT8)], [_image_input("y", TensorProto.UINT8)],
                           [helper.make_node("Identity", ["x"], ["y"])]), "takes uint8 pixels"),
    (lambda p: _graph_file(p, [_image_input(), _image_input("z")], [_image_input("y")],
                           [helper.make_node("Add", ["x", "z"], ["y"])]), "has 2 inputs"),
    (lambda p: _pooled_classifier(p, 4), "has 4 classes (axis 1 of [2, 4]) but --labels lists 3"),
    (lambda p: _pooled_classifier(p, 3, sigmoid=True), "does not sum to 1 over the classes"),
    (lambda p: _pooled_classifier(p, 3, extra_output=True), "with --output NAME"),
    (lambda p: _graph_file(p, [_image_input()], [_image_input("y")],
                           [helper.make_node("Relu", ["missing"], ["y"])]), "fails the ONNX checker"),
])
def test_user_mistakes_are_clear_errors(tmp_path: Path, capsys, make, message: str) -> None:
    code, text = _import(make(tmp_path / "model.onnx"), tmp_path, capsys)
    assert code == 2, text
    assert message in text and "Traceback" not in text
    assert not (tmp_path / "repo" / "m").exists()


def test_several_outputs_with_output_flag_and_fixed_batch_of_one(tmp_path: Path, capsys) -> None:
    path = _pooled_classifier(tmp_path / "model.onnx", 3, batch=1, extra_output=True)
    code, text = _import(path, tmp_path, capsys, "--output", "s")
    assert code == 0, text
    assert "fixed batch of 1: served with max_batch_size 1" in text
    config = _config(tmp_path / "repo", "m")
    assert config.max_batch_size == 1 and config.profile.batch == (1, 1, 1)
