"""Checkpoints: weights + ``model.json`` (what the weights are).

Weights come as a PyTorch state_dict (``.pth``/``.pt``, loaded with ``weights_only=True``), a
``.safetensors`` file (both for zoo architectures), or a ``torch.export`` program (``.pt2``)
for architectures outside the zoo: then ``architecture`` is free text, and ``task``, ``labels``
and ``input`` are required.

``model.json``::

    {"architecture": "resnet_small" | "unet" | "resnet18" | ... | "smp.Unet" | "torchvision.fcn_resnet50",
     "arch_kwargs": {...},                      # extra builder arguments
     "task": "classification" | "segmentation",
     "labels": [...],                           # class names; len = number of classes
     "input": {"height": 96, "width": 96, "mean": [r, g, b], "std": [r, g, b],
               "size_multiple": 1,              # optional: H, W must be multiples of it
               "mode": "resize" | "resize_crop",  # classifiers; default: resize_crop for
               "resize_size": 256},             # torchvision classifiers, else resize
     "metrics": {...}}                          # optional: what training measured

Preprocessing: pixel / 255, then (x - mean) / std, RGB order, NCHW float32.

``visionserve export`` flags (``--architecture``, ``--task``, ``--labels``, ``--input-size``,
``--mean``, ``--std``) fill or override these fields (:func:`metadata_for`): flags win, and no
``model.json`` is needed when the flags say it all.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from visionserve.export.models import TASK_OF_ARCHITECTURE, build_model, task_of
from visionserve.server.model_config import TASKS

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 10
PROGRAM_SUFFIXES = (".pt2",)
SAFETENSORS_SUFFIXES = (".safetensors",)
ONNX_SUFFIXES = (".onnx",)
CLASSIFIER_MODES = ("resize", "resize_crop")


def is_program(path: Path) -> bool:
    """Whether ``path`` names a ``torch.export`` program (``.pt2``) rather than weights."""
    return Path(path).suffix.lower() in PROGRAM_SUFFIXES


def read_metadata(path: Path, *, program: bool = False) -> dict[str, Any]:
    """Read and check a ``model.json``; fills defaults for ``arch_kwargs``, ``task`` and ``input``.

    ``program``: the metadata describes a ``torch.export`` program (see :func:`check_metadata`).
    """
    path = Path(path)
    data = _read_json(path)
    try:
        return check_metadata(data, program=program)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _check_task(data: dict[str, Any], program: bool) -> None:
    arch = data.get("architecture")
    if program:  # outside the zoo: the metadata must say what the program is
        data.setdefault("architecture", "torch.export program")
        if data.get("task") not in TASKS:
            raise ValueError(f"a torch.export program's metadata must give 'task' as one of {TASKS}, "
                             f"got {data.get('task')!r}")
        if not isinstance(data.get("input"), dict) or not {"height", "width"} <= set(data["input"]):
            raise ValueError("a torch.export program's metadata must give 'input' with 'height' and "
                             f"'width' (and mean/std unless ImageNet's), got {data.get('input')!r}")
        return
    task = task_of(arch) if isinstance(arch, str) else None
    if task is None:
        raise ValueError(f"'architecture' must be one of {sorted(TASK_OF_ARCHITECTURE)}, smp.<Name> "
                         f"(segmentation_models_pytorch) or torchvision.<name>, got {arch!r} "
                         "(other architectures: export a torch.export program, .pt2)")
    data.setdefault("task", task)
    if data["task"] != task:
        raise ValueError(f"architecture {arch!r} is a {task} model, but 'task' says {data['task']!r}")


def check_metadata(data: dict[str, Any], *, program: bool = False) -> dict[str, Any]:
    """Check checkpoint metadata (see the module docstring) and fill defaults; returns a copy.

    ``program``: describes a ``torch.export`` program, so ``architecture`` need not be in the
    zoo but ``task`` and ``input`` (height, width) are required.
    """
    if not isinstance(data, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(data).__name__}")  # noqa: TRY004
    data = dict(data)
    _check_task(data, program)
    labels = data.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise ValueError(f"'labels' must list at least 2 class names, got {labels!r}")
    data["arch_kwargs"] = dict(data.get("arch_kwargs") or {})
    spec = {"height": 224, "width": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    spec.update(data.get("input") or {})
    if int(spec["height"]) < 1 or int(spec["width"]) < 1 or len(spec["mean"]) != 3 or len(spec["std"]) != 3:
        raise ValueError(f"'input' needs positive height/width and 3-value mean/std, got {spec}")
    if int(spec.get("size_multiple", 1)) < 1:
        raise ValueError(f"'input.size_multiple' must be a positive integer, got {spec['size_multiple']!r}")
    if spec.get("mode") not in (None, *CLASSIFIER_MODES):
        raise ValueError(f"'input.mode' must be one of {CLASSIFIER_MODES} (classifiers; segmenters: "
                         f"export measures pad vs resize), got {spec['mode']!r}")
    data["input"] = spec
    data.setdefault("metrics", {})
    return data


def metadata_for(checkpoint: Path, metadata: Path | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checked metadata of ``checkpoint``: ``metadata`` (default: ``model.json`` beside the
    checkpoint, if there) with ``overrides`` applied on top (flags win). ``overrides`` holds
    any of ``architecture``, ``task``, ``labels``, ``arch_kwargs`` and ``input`` (a dict merged
    into the file's ``input``); None values are ignored."""
    checkpoint = Path(checkpoint)
    if checkpoint.suffix.lower() in ONNX_SUFFIXES:
        raise ValueError(f"{checkpoint} is an ONNX model, not a PyTorch checkpoint: add it to a "
                         f"repository with `visionserve import {checkpoint} --repository DIR --name NAME "
                         "--task classification|segmentation --labels FILE|a,b,c`")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    path = Path(metadata) if metadata is not None else checkpoint.with_name("model.json")
    program = is_program(checkpoint)
    if not overrides or metadata is not None:
        data = _read_json(path)
    else:
        data = _read_json(path) if path.is_file() else {}
    data = dict(data)
    data["input"] = {**(data.get("input") or {}), **overrides.pop("input", {})}
    data.update(overrides)
    try:
        return check_metadata(data, program=program)
    except ValueError as exc:
        source = f"{path} + flags" if path.is_file() else "flags (no model.json)"
        raise ValueError(f"{source}: {exc}; describe the checkpoint with --architecture, --task, "
                         "--labels, --input-size (or a model.json, see README)") from exc


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint metadata {path} not found (expected model.json beside "
                                "the checkpoint, or pass its path, or describe the checkpoint with "
                                "--architecture, --task, --labels)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Write checked metadata as ``model.json``."""
    Path(path).write_text(json.dumps(check_metadata(metadata), indent=2) + "\n", encoding="utf-8")


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: unwrap ``{"state_dict": ...}``-style dicts and strip
    ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if key is None:
                raise ValueError(f"checkpoint holds no tensors and none of the keys {_WRAPPER_KEYS}; "
                                 f"top-level keys: {_first(obj)}")
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint must be a state_dict (dict of tensors), got {type(obj).__name__}")  # noqa: TRY004
    state = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _first(keys: Any) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(map(str, keys[:_SHOW])) + more


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    expected = model.state_dict()
    arch = metadata["architecture"]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if unexpected and not missing and all(k.startswith("aux_classifier.") for k in unexpected):
        raise ValueError(f"checkpoint has an auxiliary head ({len(unexpected)} aux_classifier.* keys) that "
                         f"{arch!r} {metadata['arch_kwargs']} lacks: set arch_kwargs {{\"aux_loss\": true}} "
                         "(model.json) to load it; export serves the main head only")
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit architecture {arch!r} {metadata['arch_kwargs']}: "
            f"missing keys ({len(missing)}): [{_first(missing)}]; "
            f"unexpected keys ({len(unexpected)}): [{_first(unexpected)}]"
        )
    mismatched = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if not mismatched:
        return
    head = list(expected)[-1]  # the classifier / segmentation head is the last parameter
    num_classes = len(metadata["labels"])
    if head in mismatched and state[head].shape[0] != num_classes:
        raise ValueError(
            f"checkpoint has {state[head].shape[0]} classes ({head} has shape {tuple(state[head].shape)}), "
            f"but the metadata lists {num_classes} labels {metadata['labels'][:_SHOW]}; "
            "expected the labels to match the checkpoint's output classes"
        )
    details = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
               for k in mismatched[:_SHOW]]
    raise ValueError(f"checkpoint tensor shapes do not fit architecture {arch!r} "
                     f"{metadata['arch_kwargs']} ({len(mismatched)} differ): " + "; ".join(details))


def build_from_metadata(metadata: dict[str, Any]) -> nn.Module:
    """An untrained model as described by checkpoint metadata."""
    metadata = check_metadata(metadata)
    return build_model(metadata["architecture"], num_classes=len(metadata["labels"]),
                       **metadata["arch_kwargs"])


def _load_weights(path: Path) -> Any:
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"could not load {path} as a safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-weights objects
        raise ValueError(f"could not load {path} as a weights-only PyTorch checkpoint: {exc}") from exc


def load_program(path: Path) -> nn.Module:
    """The module of a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``).

    It is a ``GraphModule``: it cannot be switched to train/eval mode (the program was
    captured in whatever mode it was exported in -- export it in eval mode).
    """
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # zip/format errors, programs from an incompatible torch
        raise ValueError(f"could not load {path} as a torch.export program (.pt2 written by "
                         f"torch.export.save): {exc}") from exc
    return program.module()


def load_checkpoint(path: Path, metadata: dict[str, Any] | Path) -> nn.Module:
    """Build the model that ``metadata`` describes and load the weights at ``path`` (eval mode).

    ``path``: a state_dict (``.pth``; ``weights_only=True``), ``.safetensors``, or a
    ``torch.export`` program (``.pt2``: its module is returned, metadata as for programs).
    ``metadata`` is a ``model.json`` path or its parsed dict. Raises ``ValueError`` naming the
    keys that do not fit (first 10) or the class count that differs.
    """
    path = Path(path)
    program = is_program(path)
    if isinstance(metadata, (str, Path)):
        metadata = read_metadata(metadata, program=program)
    else:
        metadata = check_metadata(metadata, program=program)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if program:
        logger.info("loaded torch.export program %s (%s)", path, metadata["task"])
        return load_program(path)
    state = extract_state_dict(_load_weights(path))
    model = build_from_metadata(metadata)
    _check_keys(model, state, metadata)
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s (%s, %d classes)", path, metadata["architecture"], len(metadata["labels"]))
    return model.eval()
