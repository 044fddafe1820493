"""``visionserve build``: a model's ONNX -> TensorRT engine (+ FP16 ONNX), in its repository.

Writes REPO/NAME/VERSION/model.plan (model.fp16.plan for --precision fp16) and engine.json;
with --precision fp16, first model.fp16.onnx, validated against FP32 (exit 1 below the
agreement thresholds). Exit 2 when no engine could be built.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from visionserve.commands._args import existing_dir, positive_int

NAME = "build"
HELP = "Build a TensorRT engine (and an FP16 ONNX) for a model in a repository"

log = logging.getLogger(__name__)


def _capability(value: str) -> str:
    if not re.fullmatch(r"\d{1,2}\.\d", value):
        raise argparse.ArgumentTypeError(
            f"expected a compute capability like 8.6 or 12.0, got {value!r}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository", required=True, type=existing_dir, help="model repository directory"
    )
    parser.add_argument("--model", required=True, help="model name (a folder of the repository)")
    parser.add_argument("--version", type=positive_int, help="model version (default: the latest)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        default="fp32",
        help="fp16: build from model.fp16.onnx, written and validated first (default fp32)",
    )
    parser.add_argument(
        "--compute-capability",
        type=_capability,
        help="target GPU, e.g. 8.6 (TensorRT-RTX ahead of time; default: the local "
        "GPU, else 8.6); full TensorRT always builds for the local GPU",
    )
    parser.add_argument(
        "--workspace", type=positive_int, metavar="MB", help="builder workspace limit in MiB"
    )
    parser.add_argument(
        "--timing-cache",
        type=Path,
        metavar="PATH",
        help="timing cache file, read before and updated after the build",
    )
    parser.add_argument(
        "--flavour",
        choices=("auto", "tensorrt", "tensorrt_rtx"),
        default="auto",
        help="TensorRT library (auto: tensorrt if importable, else tensorrt_rtx)",
    )
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=200,
        help="generated images for the FP16 and engine validations (default 200)",
    )
    parser.add_argument(
        "--fp16-onnx-only",
        action="store_true",
        help="only write and validate model.fp16.onnx; build no engine",
    )


def run(args: argparse.Namespace) -> int:
    from visionserve.export.engine_build import EngineBuildError, build_engine
    from visionserve.export.fp16 import Fp16ValidationError, fp16_variant
    from visionserve.export.trt_builder import BuildOptions
    from visionserve.server.errors import NotFound
    from visionserve.server.repository import ModelRepository

    try:
        if args.fp16_onnx_only:
            entry = ModelRepository(args.repository).entry(args.model, str(args.version or ""))
            report = fp16_variant(entry.directory, entry.config, samples=args.samples)
            print(report["message"])
            return 0
        options = BuildOptions(workspace_mb=args.workspace, timing_cache=args.timing_cache)
        manifest = build_engine(
            args.repository,
            args.model,
            version=args.version,
            precision=args.precision,
            compute_capability=args.compute_capability,
            flavour=args.flavour,
            options=options,
            samples=args.samples,
        )
    except Fp16ValidationError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    except (EngineBuildError, FileNotFoundError, ValueError, NotFound) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    validation = manifest.pop("validation")
    print(json.dumps(manifest, indent=2))
    if "skipped" in validation:
        print(f"engine validation skipped: {validation['skipped']}")
        return 0
    print(
        f"engine validation: {validation['metric']} {validation[validation['metric']]:.4%} "
        f"(threshold {validation['threshold']:.2%})"
    )
    return 0 if validation["passed"] else 1
