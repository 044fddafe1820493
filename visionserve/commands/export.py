"""``visionserve export``: checkpoint -> ONNX -> validated model repository entry."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "export"
HELP = "Export a checkpoint to ONNX, validate it and write a model repository entry"


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=_existing_file, required=True, help="model.pth (a state_dict)")
    parser.add_argument("--metadata", type=_existing_file, default=None,
                        help="model.json describing the checkpoint (default: model.json beside it)")
    parser.add_argument("--repository", type=Path, required=True, help="model repository directory")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, default=None, help="version number (default: next free)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    parser.add_argument("--samples", type=Path, default=None,
                        help="directory of images to validate on (default: generated shapes)")
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default: 1e-4)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default: 1e-4)")
    parser.add_argument("--backends", default="tensorrt,onnxruntime-cuda,onnxruntime-cpu",
                        help="backend preference written to model.yaml, comma-separated "
                             "(default: tensorrt,onnxruntime-cuda,onnxruntime-cpu)")


def run(args: argparse.Namespace) -> int:
    from visionserve.export.onnx_export import export_checkpoint
    from visionserve.export.validate import ExportValidationError, format_report

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    try:
        report = export_checkpoint(args.checkpoint, args.repository, args.name, metadata=args.metadata,
                                   version=args.version, opset=args.opset, samples=args.samples,
                                   atol=args.atol, rtol=args.rtol, backends=backends)
    except ExportValidationError as exc:
        print(format_report(exc.report))
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote {report['version_dir']} (model.onnx, validation.json) and "
          f"{Path(args.repository) / args.name / 'model.yaml'}")
    return 0
