"""``visionserve import``: an ONNX file made elsewhere -> audited, validated model repository entry.

Reads the input/output names and dynamic axes, fuses Softmax (classifiers) or ArgMax -> uint8
``mask`` (segmenters) into the graph, applies the TensorRT rewrites, audits the graph (op
table + TensorRT-RTX build), validates it against the original file on generated images, and
writes REPO/NAME/VERSION/model.onnx + validation.json and REPO/NAME/model.yaml.

Exit status: 0 written; 1 the op audit or the validation failed, nothing written; 2 bad input
(the file, its inputs/outputs, the options), nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from visionserve.commands import export as export_command
from visionserve.commands._args import existing_file, labels, positive_int, size, triple
from visionserve.commands._entry import write_entry

NAME = "import"
HELP = "Import an ONNX model made elsewhere into a model repository (fused outputs, audit, validation)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=existing_file, metavar="MODEL.onnx", help="the ONNX file")
    parser.add_argument("--repository", type=Path, required=True, help="model repository directory")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--task", required=True, choices=("classification", "segmentation"))
    parser.add_argument("--labels", type=labels, required=True,
                        help="class names: a file (one per line, or a JSON list) or a,b,c")
    parser.add_argument("--mean", type=triple, default=None, metavar="R,G,B",
                        help="normalisation mean of pixel/255 the model was trained with (default: ImageNet's)")
    parser.add_argument("--std", type=triple, default=None, metavar="R,G,B",
                        help="normalisation std of pixel/255 (default: ImageNet's)")
    parser.add_argument("--input-size", type=size, default=None, metavar="HxW",
                        help="input size for models with a dynamic H, W (classifiers: the size they are "
                             "served at; segmenters: the profile's opt size; default 224x224)")
    parser.add_argument("--input-mode", choices=("resize", "resize_crop"), default="resize",
                        help="classifiers: resize (default: import cannot know how the model was "
                             "trained) or resize_crop (short side to 256/224 of the size, centre crop, "
                             "as torchvision's eval transforms)")
    parser.add_argument("--output", default=None, metavar="NAME",
                        help="the output with the logits or probabilities (segmenters: or a class-index "
                             "mask, e.g. logits.argmax(1)), when the model has several")
    parser.add_argument("--version", type=positive_int, default=None, help="version number (default: next free)")
    parser.add_argument("--backends", default=export_command._DEFAULT_BACKENDS,
                        help=f"backend preference, comma-separated (default: {export_command._DEFAULT_BACKENDS})")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="max_batch_size in model.yaml and the profile's opt batch (default: 8)")
    parser.add_argument("--with-probability", action="store_true",
                        help="segmenters: add output 'probability', the max class probability per pixel")
    parser.add_argument("--compute-capability", default="8.6",
                        help="TensorRT-RTX ahead-of-time build target for the audit (default: 8.6)")
    parser.add_argument("--no-tensorrt-check", action="store_true",
                        help="skip the TensorRT parse/build of the audit (the static op-table check still runs)")
    parser.add_argument("--allow-unsupported", action="store_true",
                        help="write the model even when the op audit says TensorRT would not build it")
    export_command._add_validation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from visionserve.export.checkpoint import IMAGENET_MEAN, IMAGENET_STD
    from visionserve.export.onnx_export import ExportOptions
    from visionserve.export.onnx_import import ImportSpec, import_onnx
    from visionserve.export.validate import Tolerances

    def attempt() -> dict[str, Any]:
        spec = ImportSpec(task=args.task, labels=tuple(args.labels),
                          mean=tuple(args.mean or IMAGENET_MEAN), std=tuple(args.std or IMAGENET_STD),
                          input_size=args.input_size, output=args.output, input_mode=args.input_mode,
                          with_probability=args.with_probability)
        options = ExportOptions(tensorrt="none" if args.no_tensorrt_check else "auto",
                                compute_capability=args.compute_capability,
                                allow_unsupported=args.allow_unsupported, max_batch_size=args.max_batch_size)
        tolerances = Tolerances(atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement)
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        return import_onnx(args.model, args.repository, args.name, spec, version=args.version,
                           backends=backends, samples=args.samples, options=options, tolerances=tolerances)

    return write_entry(attempt, args.repository, args.name)
