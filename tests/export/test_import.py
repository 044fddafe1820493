"""``visionserve import`` as a user would use it: ONNX files made with plain torch.onnx.export,
imported, served by a real server, answering like ONNX Runtime on the original file."""

from __future__ import annotations

import json
import stat
import struct
import warnings
from pathlib import Path

import cv2
import grpc
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
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc
from visionserve.server.iou import compute_iou
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
    (lambda p: _onnx_export(ArgmaxClassifier(), p, (64, 64), spatial=False, output="cls"),
     "visionserve needs a classifier's logits or probabilities (N, classes) for its top-k and scores: "
     "re-export the model without the argmax, or pass --output with its logits output"),
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


class ArgmaxSegmenter(nn.Module):
    """What a user exports to get masks out of the graph: ``logits.argmax(1)`` (keepdim or
    not, cast or not), optionally with the logits as a second output, optionally after a
    stride-2 stage (even H, W only)."""

    def __init__(self, *, keepdim: bool = False, dtype: torch.dtype | None = None,
                 logits_too: bool = False, strided: bool = False, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = TinySegmenter(classes)
        self.down = (nn.Sequential(nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Upsample(scale_factor=2))
                     if strided else nn.Identity())
        self.keepdim, self.dtype, self.logits_too = keepdim, dtype, logits_too

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(self.down(x))
        mask = logits.argmax(1, keepdim=self.keepdim)
        if self.dtype is not None:
            mask = mask.to(self.dtype)
        return (logits, mask) if self.logits_too else mask


class ArgmaxClassifier(TinyClassifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).argmax(1)


def _export_outputs(model: nn.Module, path: Path, outputs: dict[str, int]) -> Path:
    """Plain torch.onnx.export with a dynamic batch, H and W; ``outputs``: name -> rank."""
    spatial = {0: "batch", 2: "height", 3: "width"}
    axes = {name: spatial if rank == 4 else {0: "batch", 1: "height", 2: "width"}
            for name, rank in outputs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 3, 64, 64),), str(path), input_names=["input"],
                          output_names=list(outputs), dynamic_axes={"input": spatial, **axes})
    return path


def _original_mask(path: Path, image: np.ndarray, output: str = "pred") -> np.ndarray:
    """The original graph's mask of ``image`` at its own size."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = preprocess(image, InputSpec(height=image.shape[0], width=image.shape[1], mode="resize"))[None]
    (mask,) = session.run([output], {"input": x})
    return mask.reshape(image.shape[:2])


def _png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array)
    assert ok
    return data.tobytes()


def _kserve_segment(port: int, model: str, image: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """KServe v2 ModelInfer with an encoded IMAGE and GROUND_TRUTH: MASK, INTERSECTION, UNION."""
    request = kpb.ModelInferRequest(model_name=model)
    for name, data in (("IMAGE", _png(image)), ("GROUND_TRUTH", _png(truth))):
        request.inputs.add(name=name, datatype="BYTES", shape=[1]).contents.bytes_contents.append(data)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    dtypes = {"UINT8": np.uint8, "INT64": "<i8"}
    return {t.name: np.frombuffer(raw, dtypes[t.datatype]).reshape(t.shape)
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)}


def _noisy_truth(mask: np.ndarray, seed: int = 5) -> np.ndarray:
    """``mask`` with a tenth of its pixels moved to another class and its corner ignored."""
    rng = np.random.default_rng(seed)
    truth = mask.astype(np.uint8).copy()
    moved = rng.random(truth.shape) < 0.1
    truth[moved] = (truth[moved] + 1) % len(LABELS)
    truth[:4, :4] = 255
    return truth


def test_segmenter_ending_in_argmax_is_served_like_the_original(tmp_path: Path, start_server, capsys) -> None:
    """logits.argmax(1) (int64 N x H x W) is kept as the mask: served masks equal ONNX Runtime on
    the original file at a bucket size and past the largest bucket (tiled), IoU and KServe's
    MASK work without probabilities."""
    path = _export_outputs(ArgmaxSegmenter(), tmp_path / "argmax.onnx", {"pred": 3})
    repo = tmp_path / "repo"
    code = main(["import", str(path), "--repository", str(repo), "--name", "argmax-seg",
                 "--task", "segmentation", "--labels", ",".join(LABELS), "--input-size", "64x64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "note: output 'pred' is a class-index mask already" in out and "cast from int64 to uint8" in out
    config = _config(repo, "argmax-seg")
    assert set(config.outputs) == {"mask"} and config.input.mode == "pad"
    assert any("no per-pixel probabilities" in note for note in config.notes)
    validation = json.loads((repo / "argmax-seg" / "1" / "validation.json").read_text())
    assert validation["passed"] and validation["import"]["mask_cast"] == "int64 -> uint8"
    assert all(check["mask"]["agreement"] == 1.0 for check in validation["checks"])
    graph = onnx.load(str(repo / "argmax-seg" / "1" / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["mask"] and graph.node[-1].op_type == "Cast"
    big = config.input.buckets[-1] + 40
    server = start_server(repository=repo)
    with VisionClient(f"127.0.0.1:{server.port}") as client:
        for (height, width), mode in (((96, 128), "bucket"), ((big, big + 30), "tiled")):
            image = _images(1, height, width)[0]
            reference = _original_mask(path, image)
            truth = _noisy_truth(reference)
            result = client.segment(image, model="argmax-seg", ground_truth=truth)
            assert result.serving.mode == mode
            assert np.array_equal(result.mask, reference)
            expected = compute_iou(reference, truth, len(LABELS), 255)
            assert result.iou.mean_iou == pytest.approx(expected.mean_iou)
            assert 0.5 < result.iou.mean_iou < 1.0
    kserve = _kserve_segment(server.port, "argmax-seg", image, truth)
    assert np.array_equal(kserve["MASK"][0], reference)
    assert np.array_equal(kserve["INTERSECTION"][0], expected.intersection)
    assert np.array_equal(kserve["UNION"][0], expected.union)


@pytest.mark.parametrize(("module", "rank", "cast", "multiple"), [
    (ArgmaxSegmenter(keepdim=True), 4, "int64 -> uint8", 1),
    (ArgmaxSegmenter(dtype=torch.uint8), 3, None, 1),  # the Cast is in the user's graph already
    (ArgmaxSegmenter(dtype=torch.int32, keepdim=True), 4, "int32 -> uint8", 1),
    (ArgmaxSegmenter(strided=True), 3, "int64 -> uint8", 2),
], ids=["keepdim-int64", "uint8", "keepdim-int32", "strided"])
def test_index_masks_of_any_integer_type_become_the_uint8_mask(tmp_path: Path, module: nn.Module, rank: int,
                                                               cast: str | None, multiple: int) -> None:
    path = _export_outputs(module, tmp_path / "argmax.onnx", {"pred": rank})
    repo = tmp_path / "repo"
    report = import_onnx(path, repo, "m", ImportSpec(task="segmentation", labels=LABELS, input_size=(64, 64)))
    assert report["passed"] and report["source"]["output_kind"] == "mask"
    assert report["import"]["mask_cast"] == cast and report["import"]["size_multiple"] == multiple
    # odd sizes included (75x131, 33x47): padded to the multiple, cropped back, every pixel equal
    assert all(check["mask"]["agreement"] == 1.0 for check in report["checks"])
    session = ort.InferenceSession(str(repo / "m" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(o.name, o.type) for o in session.get_outputs()] == [("mask", "tensor(uint8)")]
    image = _images(1, 64, 96)[0]
    (mask,) = session.run(None, {"input": preprocess(image, InputSpec(height=64, width=96, mode="resize"))[None]})
    assert mask.shape == (1, 64, 96) and np.array_equal(mask[0], _original_mask(path, image))


@pytest.mark.parametrize("flag", [[], ["--output", "pred"]], ids=["default", "output-flag"])
def test_logits_and_mask_outputs_use_the_logits_unless_told(tmp_path: Path, capsys, flag: list[str]) -> None:
    path = _export_outputs(ArgmaxSegmenter(logits_too=True), tmp_path / "two.onnx", {"logits": 4, "pred": 3})
    repo = tmp_path / "repo"
    code = main(["import", str(path), "--repository", str(repo), "--name", "m", "--task", "segmentation",
                 "--labels", ",".join(LABELS), "--input-size", "64x64", "--no-tensorrt-check", *flag])
    out = capsys.readouterr().out
    assert code == 0, out
    validation = json.loads((repo / "m" / "1" / "validation.json").read_text())
    assert validation["passed"]
    if flag:
        assert validation["source"]["output_kind"] == "mask" and "'pred' is a class-index mask" in out
    else:
        assert validation["source"] == validation["source"] | {"output": "logits", "output_kind": "logits"}
        assert "using 'logits'" in out and "--output NAME to use 'pred' instead" in out
        assert _config(repo, "m").notes  # the choice is kept in model.yaml


@pytest.mark.parametrize(("labels", "extra", "message"), [
    (",".join(f"c{i}" for i in range(300)), [], "at most 255 classes, got 300 labels"),
    ("a,b", [], "on generated images, but --labels lists 2 classes (indices 0..1)"),
    (",".join(f"c{i}" for i in range(8)), ["--with-probability"], "--with-probability needs class scores"),
], ids=["too-many-labels", "too-few-labels", "with-probability"])
def test_index_mask_mistakes_are_clear_errors(tmp_path: Path, capsys, labels: str, extra: list[str],
                                              message: str) -> None:
    path = _export_outputs(ArgmaxSegmenter(classes=8), tmp_path / "argmax.onnx", {"pred": 3})
    code = main(["import", str(path), "--repository", str(tmp_path / "repo"), "--name", "m",
                 "--task", "segmentation", "--labels", labels, "--no-tensorrt-check", *extra])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert message in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "repo" / "m").exists()
