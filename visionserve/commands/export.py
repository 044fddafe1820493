"""``visionserve export``: checkpoint -> ONNX -> op audit -> validated model repository entry.

Exit status: 0 written; 1 the op audit (TensorRT would not build the graph) or the
validation (ONNX Runtime vs PyTorch beyond the tolerances) failed, nothing written;
2 bad input (checkpoint, metadata, options).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionserve.commands._args import existing_file
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
                             "(default: model.json beside the checkpoint)")
    parser.add_argument("--repository", type=Path, required=True, help="model repository directory")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, default=None, help="version number (default: next free)")
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
                        help="absolute tolerance of float outputs vs PyTorch (default: 1e-4)")
    parser.add_argument("--rtol", type=_non_negative, default=1e-4,
                        help="relative tolerance of float outputs vs PyTorch (default: 1e-4)")
    parser.add_argument("--min-agreement", type=_share, default=1.0,
                        help="least share of unambiguous top-1 classes / mask pixels that must equal "
                             "PyTorch's (default: 1.0)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    _add_graph_arguments(parser)
    _add_validation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from visionserve.export.onnx_export import (
        ExportAuditError,
        ExportOptions,
        audit_summary,
        export_checkpoint,
    )
    from visionserve.export.validate import ExportValidationError, Tolerances, format_report

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    try:
        options = ExportOptions(opset=args.opset, with_probability=args.with_probability,
                                with_logits=args.with_logits,
                                tensorrt="none" if args.no_tensorrt_check else "auto",
                                compute_capability=args.compute_capability,
                                allow_unsupported=args.allow_unsupported, max_batch_size=args.max_batch_size)
        tolerances = Tolerances(atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement)
        report = export_checkpoint(args.checkpoint, args.repository, args.name, metadata=args.metadata,
                                   version=args.version, samples=args.samples, backends=backends,
                                   options=options, tolerances=tolerances)
    except ExportAuditError as exc:
        print(audit_summary(exc.report))
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 1
    except ExportValidationError as exc:
        print(format_report(exc.report))
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(report["audit_summary"])
    if report["audit"]["allowed_unsupported"]:
        print("warning: TensorRT would not build this model (--allow-unsupported): "
              + "; ".join(report["audit"]["problems"][:5]), file=sys.stderr)
    print(f"wrote {report['version_dir']} (model.onnx, validation.json) and "
          f"{Path(args.repository) / args.name / 'model.yaml'}")
    return 0
