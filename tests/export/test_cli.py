"""The generate / train / export subcommands, run in-process through ``visionserve.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from visionserve.server.model_config import ModelConfig

from visionserve.cli import main


def test_generate_train_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--out", str(tmp_path / "train"), "--count", "48", "--size", "64"]) == 0
    assert main(["generate", "--out", str(tmp_path / "val"), "--count", "16", "--size", "64",
                 "--seed", "1"]) == 0
    assert len(list((tmp_path / "train/images").glob("*.png"))) == 48
    train = ["train", "--task", "segmentation", "--data", str(tmp_path / "train"),
             "--val", str(tmp_path / "val"), "--out", str(tmp_path / "ckpt"), "--epochs", "1",
             "--batch-size", "16", "--arch-kwargs", '{"base_channels": 4, "depth": 3}', "--loss", "soft-iou"]
    # a floor no one-epoch model reaches: exit 1 naming the classes; the checkpoint is still written
    assert main([*train, "--min-class-iou", "0.999"]) == 1
    captured = capsys.readouterr()
    assert "epoch   1" in captured.out and "per-class IoU" in captured.out
    assert "quality floor: held-out IoU below --min-class-iou 0.999 for " in captured.err
    assert any(f" {name} 0." in captured.err for name in ("background", "circle", "square", "triangle"))
    assert (tmp_path / "ckpt/model.pth").is_file()
    meta = json.loads((tmp_path / "ckpt/model.json").read_text())
    assert meta["metrics"]["config"]["loss"] == "soft-iou"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt/model.pth"),
                 "--repository", str(tmp_path / "repo"), "--name", "shapes-seg"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "mask" in out
    assert "receptive field 103 px (radius 51, output stride 8)" in out
    assert ModelConfig.load(tmp_path / "repo/shapes-seg/model.yaml").task == "segmentation"
    assert json.loads((tmp_path / "repo/shapes-seg/1/validation.json").read_text())["passed"]


def test_export_records_the_segnet_receptive_field(tmp_path: Path, checkpoint_factory,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A SegNet's receptive field is read through the pooling rewrite's graph: printed,
    recorded in validation.json and model.yaml (the server's tile margin comes from it).
    47 px, radius 23, stride 4 for depth 2: by hand in test_receptive_field.py."""
    metadata = {"architecture": "segnet", "arch_kwargs": {"base_channels": 4, "depth": 2},
                "labels": ["background", "a", "b"], "input": {"height": 32, "width": 32}}
    checkpoint = checkpoint_factory(tmp_path / "ckpt", metadata)
    assert main(["export", "--checkpoint", str(checkpoint), "--repository", str(tmp_path / "repo"),
                 "--name", "segnet", "--no-tensorrt-check"]) == 0
    assert "receptive field 47 px (radius 23, output stride 4)" in capsys.readouterr().out
    config = ModelConfig.load(tmp_path / "repo/segnet/model.yaml")
    assert (config.input.receptive_field.size, config.input.receptive_field.radius,
            config.input.receptive_field.stride) == (47, 23, 4)
    recorded = json.loads((tmp_path / "repo/segnet/1/validation.json").read_text())
    assert recorded["receptive_field"] == {"computed": True, "size": 47, "radius": 23, "stride": 4}


def test_export_failure_exits_non_zero(tmp_path: Path, classifier_checkpoint: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", "--checkpoint", str(classifier_checkpoint), "--repository", str(tmp_path / "r"),
                 "--name", "m", "--atol", "0", "--rtol", "0"])
    assert code == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "nothing was written" in captured.err
    assert not (tmp_path / "r/m/1").exists()


def test_export_reports_bad_metadata(tmp_path: Path, classifier_checkpoint: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"architecture": "unet", "labels": ["a", "b"]}))
    code = main(["export", "--checkpoint", str(classifier_checkpoint), "--metadata", str(bad),
                 "--repository", str(tmp_path / "r"), "--name", "m"])
    assert code == 2
    assert "missing keys" in capsys.readouterr().err


def test_parser_validates_paths(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--task", "segmentation", "--data", str(tmp_path / "absent"),
              "--val", str(tmp_path), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit):
        main(["generate", "--out", str(tmp_path), "--count", "0"])


def test_export_max_batch_size_above_the_default_profile(tmp_path: Path, classifier_checkpoint: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--max-batch-size 40 once made the profile (1, 40, 32), refused as opt > max."""
    code = main(["export", "--checkpoint", str(classifier_checkpoint), "--repository", str(tmp_path / "r"),
                 "--name", "m", "--max-batch-size", "40", "--no-tensorrt-check"])
    assert code == 0, capsys.readouterr().err
    config = ModelConfig.load(tmp_path / "r/m/model.yaml")
    assert config.max_batch_size == 40
    assert config.profile.batch == (1, 40, 40)
    assert config.max_input_shape()[0] <= config.profile.batch[2]
