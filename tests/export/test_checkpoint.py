from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from visionserve.export.checkpoint import (
    build_from_metadata,
    check_metadata,
    extract_state_dict,
    load_checkpoint,
    read_metadata,
)

CLASSIFIER_METADATA = {"architecture": "resnet_small", "labels": ["circle", "square", "triangle"],
                       "input": {"height": 64, "width": 64}}
SEGMENTER_METADATA = {"architecture": "unet", "arch_kwargs": {"base_channels": 4, "depth": 3},
                      "labels": ["background", "circle", "square", "triangle"],
                      "input": {"height": 64, "width": 64}}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("metadata", [CLASSIFIER_METADATA, SEGMENTER_METADATA], ids=["resnet", "unet"])
def test_round_trip(tmp_path: Path, metadata: dict, checkpoint_factory) -> None:
    path = checkpoint_factory(tmp_path, metadata, seed=3)
    torch.manual_seed(3)
    expected = build_from_metadata(metadata)
    loaded = load_checkpoint(path, tmp_path / "model.json")
    assert _same_weights(loaded, expected)
    assert not loaded.training


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": sd, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}},
    lambda sd: {"model": {"state_dict": sd}},
    lambda sd: OrderedDict((f"module.{k}", v) for k, v in sd.items()),
    lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
], ids=["state_dict", "model", "nested", "module-prefix", "wrapped-prefixed"])
def test_wrapped_and_prefixed_checkpoints_load(tmp_path: Path, wrap) -> None:
    torch.manual_seed(1)
    model = build_from_metadata(CLASSIFIER_METADATA)
    torch.save(wrap(model.state_dict()), tmp_path / "model.pth")
    assert _same_weights(load_checkpoint(tmp_path / "model.pth", CLASSIFIER_METADATA), model)


def test_wrong_keys_are_listed(tmp_path: Path) -> None:
    state = build_from_metadata(CLASSIFIER_METADATA).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \[fc.bias\].*unexpected keys \(1\): \[extra.weight\]"):
        load_checkpoint(tmp_path / "model.pth", CLASSIFIER_METADATA)


def test_other_architecture_lists_first_keys(tmp_path: Path) -> None:
    torch.save(build_from_metadata(SEGMENTER_METADATA).state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match=r"resnet_small.*missing keys \(\d+\): \[conv1.weight.*and \d+ more"):
        load_checkpoint(tmp_path / "model.pth", CLASSIFIER_METADATA)


def test_wrong_class_count_is_explained(tmp_path: Path) -> None:
    five = dict(CLASSIFIER_METADATA, labels=["a", "b", "c", "d", "e"])
    torch.save(build_from_metadata(five).state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match=r"checkpoint has 5 classes.*metadata lists 3 labels"):
        load_checkpoint(tmp_path / "model.pth", CLASSIFIER_METADATA)
    seg3 = dict(SEGMENTER_METADATA, labels=["bg", "a", "b"])
    torch.save(build_from_metadata(seg3).state_dict(), tmp_path / "seg.pth")
    with pytest.raises(ValueError, match=r"checkpoint has 3 classes \(head.bias"):
        load_checkpoint(tmp_path / "seg.pth", SEGMENTER_METADATA)


def test_other_arch_kwargs_give_shape_report(tmp_path: Path) -> None:
    wider = dict(SEGMENTER_METADATA, arch_kwargs={"base_channels": 8, "depth": 3})
    torch.save(build_from_metadata(wider).state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match=r"shapes do not fit.*encoders.0.0.weight: checkpoint \(8, 3, 3, 3\)"):
        load_checkpoint(tmp_path / "model.pth", SEGMENTER_METADATA)


def test_non_weights_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(tmp_path / "model.pth", CLASSIFIER_METADATA)
    torch.save({"epoch": 3, "notes": {"a": 1}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds no tensors"):
        load_checkpoint(tmp_path / "other.pth", CLASSIFIER_METADATA)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pth", CLASSIFIER_METADATA)


def test_extract_state_dict_rejects_non_dicts() -> None:
    with pytest.raises(ValueError, match="state_dict"):
        extract_state_dict([torch.zeros(1)])


def test_metadata_checks_and_defaults(tmp_path: Path) -> None:
    filled = check_metadata({"architecture": "resnet18", "labels": ["a", "b"]})
    assert filled["task"] == "classification" and filled["arch_kwargs"] == {}
    assert filled["input"]["height"] == 224 and len(filled["input"]["mean"]) == 3
    with pytest.raises(ValueError, match="'architecture' must be one of"):
        check_metadata({"architecture": "vgg", "labels": ["a", "b"]})
    with pytest.raises(ValueError, match="'labels'"):
        check_metadata({"architecture": "unet", "labels": ["only"]})
    with pytest.raises(ValueError, match="segmentation model.*'classification'"):
        check_metadata({"architecture": "unet", "labels": ["a", "b"], "task": "classification"})
    (tmp_path / "model.json").write_text("{broken")
    with pytest.raises(ValueError, match="model.json: not valid JSON"):
        read_metadata(tmp_path / "model.json")
    (tmp_path / "model.json").write_text(json.dumps({"architecture": "unet"}))
    with pytest.raises(ValueError, match="model.json: 'labels'"):
        read_metadata(tmp_path / "model.json")


def test_safetensors_checkpoints_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(2)
    model = build_from_metadata(SEGMENTER_METADATA)
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    assert _same_weights(load_checkpoint(tmp_path / "m.safetensors", SEGMENTER_METADATA), model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.bias"}
    save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \[head.bias\]"):
        load_checkpoint(tmp_path / "short.safetensors", SEGMENTER_METADATA)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="as a safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors", SEGMENTER_METADATA)


def test_torch_export_programs_load_with_program_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1)).eval()
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: dim},))
    torch.export.save(program, tmp_path / "model.pt2")
    metadata = {"architecture": "my-net", "task": "segmentation", "labels": ["bg", "fg"],
                "input": {"height": 16, "width": 16}}
    loaded = load_checkpoint(tmp_path / "model.pt2", metadata)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="must give 'task'"):
        load_checkpoint(tmp_path / "model.pt2", {"labels": ["bg", "fg"], "input": {"height": 16, "width": 16}})
    with pytest.raises(ValueError, match="must give 'input' with 'height' and 'width'"):
        load_checkpoint(tmp_path / "model.pt2", {"task": "segmentation", "labels": ["bg", "fg"]})
    with pytest.raises(ValueError, match="'architecture' must be one of.*torch.export program"):
        load_checkpoint(tmp_path / "model.pth", metadata)  # weights need a zoo architecture
    (tmp_path / "broken.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="as a torch.export program"):
        load_checkpoint(tmp_path / "broken.pt2", metadata)
