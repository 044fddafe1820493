"""The ``visionserve`` command: one subcommand per module in ``visionserve.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported lazily, so ``visionserve serve`` never
imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "generate": "Generate the synthetic shapes data set (images, masks, labels)",
    "train": "Train the demo ResNet classifier or UNet segmenter on a data set",
    "export": "Export a checkpoint to ONNX (TensorRT-compatible, op-audited, validated) into a model repository",
    "import": "Import an ONNX model made elsewhere into a model repository (fused outputs, audit, validation)",
    "build": "Build a TensorRT engine (and an FP16 ONNX) for a model in a repository",
    "serve": "Serve a model repository over gRPC",
    "segment": "Segment a folder of images through a server; masks + IoU report",
    "classify": "Classify a folder of images through a server; CSV of top-k labels",
    "demo": "Run the whole pipeline end to end on generated data",
}


_MODULES = {"import": "import_onnx"}  # a module cannot be called ``import``


def _load(name: str):
    return importlib.import_module(f"visionserve.commands.{_MODULES.get(name, name)}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen command's module is imported (its imports may be heavy).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(_load(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
