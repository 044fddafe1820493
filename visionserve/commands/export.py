"""``visionserve export``: checkpoint -> ONNX -> op audit -> validated model repository entry.

Exit status: 0 written; 1 the op audit (TensorRT would not build the graph) or the
validation (ONNX Runtime vs PyTorch beyond the tolerances) failed, nothing written;
2 bad input (checkpoint, metadata, options).

What the checkpoint is comes from flags (--architecture, --task, --labels, --input-size,
--mean/--std, --arch-kwargs) and/or model.json; flags win. An .onnx file is pointed to
``visionserve import``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from visionserve.commands._args import existing_file, labels, positive_int, size, triple
from visionserve.commands._entry import write_entry
from visionserve.server.backends.registry import BACKEND_NAMES

NAME = "export"
HELP = "Export a checkpoint to ONNX, audit it for TensorRT, validate it and write a model repository entry"
_DEFAULT_BACKENDS = ",".join(BACKEND_NAMES)  # best first


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a tolerance >= 0, got {text}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=existing_file, required=True,
                        help="weights: a state_dict .pth/.pt (loaded weights_only), .safetensors, or a "
                             "torch.export program .pt2 (architectures outside the zoo)")
    parser.add_argument("--metadata", type=existing_file, default=None,
                        help="model.json describing the checkpoint: architecture, task, labels, input "
                             "(default: model.json beside the checkpoint, if there; the flags below win)")
    parser.add_argument("--architecture", default=None,
                        help="zoo name (resnet50, unet, ...), smp.<Name> (segmentation_models_pytorch, "
                             "e.g. smp.Unet) or torchvision.<name> (e.g. torchvision.fcn_resnet50)")
    parser.add_argument("--task", choices=("classification", "segmentation"), default=None,
                        help="default: the architecture's")
    parser.add_argument("--labels", type=labels, default=None,
                        help="class names: a file (one per line, or a JSON list) or a,b,c")
    parser.add_argument("--input-size", type=size, default=None, metavar="HxW",
                        help="the size the model was trained at, e.g. 224x224 (default 224x224)")
    parser.add_argument("--mean", type=triple, default=None, metavar="R,G,B",
                        help="normalisation mean of pixel/255 (default: ImageNet's)")
    parser.add_argument("--std", type=triple, default=None, metavar="R,G,B",
                        help="normalisation std of pixel/255 (default: ImageNet's)")
    parser.add_argument("--input-mode", choices=("resize", "resize_crop"), default=None,
                        help="classifiers: how images become the input (resize_crop: short side to "
                             "256/224 of the size, centre crop, as torchvision's eval transforms; "
                             "default: resize_crop for torchvision classifiers, else resize)")
    parser.add_argument("--arch-kwargs", default=None, metavar="JSON",
                        help='extra builder arguments as JSON, e.g. \'{"encoder_name": "resnet34"}\'')
    parser.add_argument("--repository", type=Path, required=True, help="model repository directory")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--version", type=positive_int, default=None, help="version number (default: next free)")
    parser.add_argument("--backends", default=_DEFAULT_BACKENDS,
                        help=f"backend preference written to model.yaml, comma-separated (default: {_DEFAULT_BACKENDS})")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="max_batch_size in model.yaml and the profile's opt batch (default: 8)")


def _add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opset", type=int, default=17,
                        help="ONNX opset (default: 17; torch.export programs may get 18)")
    parser.add_argument("--with-probability", action="store_true",
                        help="segmenters: add output 'probability', the max softmax probability per pixel "
                             "(float32 N x H x W) beside 'mask'")
    parser.add_argument("--with-logits", action="store_true",
                        help="segmenters: keep the raw logits (N x C x H x W) as output 'logits' "
                             "(classifiers always have 'logits' and 'probabilities')")
    parser.add_argument("--compute-capability", default="8.6",
                        help="TensorRT-RTX ahead-of-time build target for the audit, e.g. 8.0, 8.6, 8.9, 12.0 "
                             "(default: 8.6; full TensorRT builds for the local GPU instead)")
    parser.add_argument("--no-tensorrt-check", action="store_true",
                        help="skip the TensorRT parse/build of the audit (the static op-table check still runs)")
    parser.add_argument("--allow-unsupported", action="store_true",
                        help="write the model even when the op audit says TensorRT would not build it "
                             "(ONNX Runtime can still serve it)")


def _add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=Path, default=None,
                        help="directory of images to validate on (default: generated shapes; "
                             "tie-heavy flat images are always added)")
    parser.add_argument("--atol", type=_non_negative, default=1e-4,
                        help="tolerance of float outputs vs PyTorch, relative to the outputs' scale "
                             "max(1, max|output|) (default: 1e-4)")
    parser.add_argument("--rtol", type=_non_negative, default=1e-4,
                        help="relative tolerance of float outputs vs PyTorch (default: 1e-4)")
    parser.add_argument("--min-agreement", type=_share, default=1.0,
                        help="least share of unambiguous top-1 classes / mask pixels that must equal "
                             "PyTorch's (default: 1.0)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_graph_arguments(parser)
    _add_validation_arguments(parser)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The metadata fields given as flags (they win over model.json)."""
    spec: dict[str, Any] = {}
    if args.input_size:
        spec["height"], spec["width"] = args.input_size
    if args.mean:
        spec["mean"] = args.mean
    if args.std:
        spec["std"] = args.std
    if args.input_mode:
        spec["mode"] = args.input_mode
    kwargs = None
    if args.arch_kwargs:
        try:
            kwargs = json.loads(args.arch_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--arch-kwargs is not valid JSON ({exc})") from exc
        if not isinstance(kwargs, dict):
            raise ValueError(f"--arch-kwargs must be a JSON object, got {args.arch_kwargs}")
    return {"architecture": args.architecture, "task": args.task, "labels": args.labels,
            "arch_kwargs": kwargs, "input": spec or None}


def run(args: argparse.Namespace) -> int:
    from visionserve.export.onnx_export import ExportOptions, export_checkpoint
    from visionserve.export.validate import Tolerances

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())

    def attempt() -> dict[str, Any]:
        options = ExportOptions(opset=args.opset, with_probability=args.with_probability,
                                with_logits=args.with_logits,
                                tensorrt="none" if args.no_tensorrt_check else "auto",
                                compute_capability=args.compute_capability,
                                allow_unsupported=args.allow_unsupported, max_batch_size=args.max_batch_size)
        tolerances = Tolerances(atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement)
        return export_checkpoint(args.checkpoint, args.repository, args.name, metadata=args.metadata,
                                 overrides=overrides_from(args), version=args.version, samples=args.samples,
                                 backends=backends, options=options, tolerances=tolerances)

    return write_entry(attempt, args.repository, args.name)
