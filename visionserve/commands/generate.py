"""``visionserve generate``: write the synthetic shapes data set (images, masks, labels)."""

from __future__ import annotations

import argparse
from pathlib import Path

from visionserve.commands._args import positive_int

NAME = "generate"
HELP = "Generate the synthetic shapes data set (images, masks, labels)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output data set directory")
    parser.add_argument("--count", type=positive_int, default=3000,
                        help="number of images (default: 3000, what the training defaults were tuned on)")
    parser.add_argument("--size", type=int, default=96, help="image height and width in pixels (default: 96)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; same seed -> identical files (default: 0; use another for held-out data)")


def run(args: argparse.Namespace) -> int:
    from visionserve.export.datasets import generate_dataset

    if args.size < 32:
        raise SystemExit(f"--size must be at least 32, got {args.size}")
    out = generate_dataset(args.out, args.count, size=args.size, seed=args.seed, progress=True)
    print(f"wrote {args.count} images ({args.size}x{args.size}, seed {args.seed}) to {out}")
    return 0
