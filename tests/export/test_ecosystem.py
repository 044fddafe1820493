"""export with flags instead of model.json; segmentation_models_pytorch and torchvision models.

Small input sizes keep these fast; each goes through the op audit (TensorRT-RTX build where
installed), validation and the repository writer.
"""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet50, segmentation
from visionserve.cli import main
from visionserve.server.model_config import ModelConfig

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def _export(capsys, *args: str) -> tuple[int, str]:
    code = main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _entry(repo: Path, name: str) -> tuple[ModelConfig, dict]:
    report = json.loads((repo / name / "1" / "validation.json").read_text())
    return ModelConfig.load(repo / name / "model.yaml"), report


def test_fine_tuned_resnet50_exports_with_one_command(tmp_path: Path, capsys) -> None:
    """A torchvision ResNet-50 fine-tuned to 37 classes, saved as {'epoch', 'state_dict'},
    plus a labels file: no model.json."""
    torch.manual_seed(0)
    torch.save({"epoch": 3, "state_dict": resnet50(num_classes=37).state_dict()}, tmp_path / "pets.pth")
    (tmp_path / "labels.txt").write_text("\n".join(f"breed_{i}" for i in range(37)) + "\n")
    repo = tmp_path / "repo"
    code, text = _export(capsys, "--checkpoint", str(tmp_path / "pets.pth"), "--architecture", "resnet50",
                         "--labels", str(tmp_path / "labels.txt"), "--input-size", "64x64",
                         "--repository", str(repo), "--name", "pets")
    assert code == 0, text
    config, report = _entry(repo, "pets")
    assert config.task == "classification" and len(config.labels) == 37
    assert (config.input.height, config.input.width) == (64, 64)
    # torchvision classifiers: torchvision's eval transforms (resize 256/224 of the crop, centre crop)
    assert config.input.mode == "resize_crop" and config.input.resize_size == 73
    assert report["passed"] and report["audit"]["ok"]
    assert not (tmp_path / "model.json").exists()
    for path in (repo / "pets" / "model.yaml", repo / "pets" / "1" / "model.onnx",
                 repo / "pets" / "1" / "validation.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_smp_unet_exports(tmp_path: Path, capsys) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch", reason="pip install 'visionserve[smp]'")
    torch.manual_seed(0)
    model = smp.Unet(encoder_name="resnet34", encoder_weights=None, classes=3)
    torch.save(model.state_dict(), tmp_path / "unet.pth")
    repo = tmp_path / "repo"
    code, text = _export(capsys, "--checkpoint", str(tmp_path / "unet.pth"), "--architecture", "smp.Unet",
                         "--arch-kwargs", '{"encoder_name": "resnet34"}', "--labels", "bg,road,car",
                         "--input-size", "64x64", "--repository", str(repo), "--name", "unet")
    assert code == 0, text
    config, report = _entry(repo, "unet")
    assert report["export"]["size_multiple"] == 1  # smp 0.6's Unet takes any size (found by running it)
    assert report["passed"] and report["audit"]["ok"]
    if HAS_RTX:
        assert report["audit"]["tensorrt"]["built"]
    assert config.input.mode == report["serving"]["mode"]
    assert f"serving: input mode {config.input.mode}" in text


@pytest.mark.parametrize(("name", "multiple"), [("FPN", 32), ("DeepLabV3Plus", 16), ("Unet", 1)])
def test_size_multiple_is_found_by_running_the_model(name: str, multiple: int) -> None:
    """smp's FPN and DeepLabV3Plus refuse sizes that are not multiples of their output stride."""
    smp = pytest.importorskip("segmentation_models_pytorch", reason="pip install 'visionserve[smp]'")
    from visionserve.export.model_probe import torch_size_multiple

    model = getattr(smp, name)(encoder_name="resnet18", encoder_weights=None, classes=2).eval()
    assert torch_size_multiple(model) == multiple


def test_torchvision_segmentation_model_exports_its_out_entry(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "lraspp.pth")
    repo = tmp_path / "repo"
    code, text = _export(capsys, "--checkpoint", str(tmp_path / "lraspp.pth"),
                         "--architecture", "torchvision.lraspp_mobilenet_v3_large", "--labels", "bg,a,b",
                         "--input-size", "64x64", "--repository", str(repo), "--name", "lraspp")
    assert code == 0, text
    config, report = _entry(repo, "lraspp")
    assert report["passed"] and report["audit"]["ok"] and config.task == "segmentation"
    serving = report["serving"]
    assert serving["measured"] and 0.0 <= serving["pad_mask_agreement"] <= 1.0
    assert config.input.mode == serving["mode"]


class _DictWithoutOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x.mean((2, 3))}


def test_user_mistakes_are_clear_errors(tmp_path: Path, capsys) -> None:
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not really onnx")
    code, text = _export(capsys, "--checkpoint", str(onnx_file), "--repository", str(tmp_path / "r"),
                         "--name", "m")
    assert code == 2 and "visionserve import" in text and "weights_only" not in text
    torch.save(resnet50(num_classes=4).state_dict(), tmp_path / "r50.pth")
    code, text = _export(capsys, "--checkpoint", str(tmp_path / "r50.pth"), "--repository", str(tmp_path / "r"),
                         "--name", "m")
    assert code == 2 and "--architecture" in text
    code, text = _export(capsys, "--checkpoint", str(tmp_path / "r50.pth"), "--architecture", "resnet50",
                         "--labels", "a,b,c", "--repository", str(tmp_path / "r"), "--name", "m")
    assert code == 2 and "4 classes" in text and "3 labels" in text
    code, text = _export(capsys, "--checkpoint", str(tmp_path / "r50.pth"), "--architecture", "smp.Nope",
                         "--labels", "a,b", "--repository", str(tmp_path / "r"), "--name", "m")
    assert code == 2 and "Nope" in text
    assert "Traceback" not in text


def test_dict_output_without_out_entry_is_explained() -> None:
    from visionserve.export.model_probe import single_tensor_model

    with pytest.raises(ValueError, match=r"returns a dict with keys \['logits'\].*'out' entry"):
        single_tensor_model(_DictWithoutOut(), 32, 32)
