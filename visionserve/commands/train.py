"""``visionserve train``: train the demo ResNet classifier or UNet segmenter on a data set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visionserve.commands._args import existing_dir

NAME = "train"
HELP = "Train the demo ResNet classifier or UNet segmenter on a data set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("classification", "segmentation"), required=True)
    parser.add_argument("--data", type=existing_dir, required=True, help="training data set directory")
    parser.add_argument("--val", type=existing_dir, required=True,
                        help="held-out data set directory (evaluated after every epoch)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory (model.pth + model.json)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs (default: 6 classification, 4 segmentation)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak one-cycle learning rate (default: 3e-3 classification, 5e-3 segmentation)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--aux-mask-weight", type=float, default=1.0,
                        help="classification: weight of the auxiliary mask loss on ResNet layer3 "
                             "(deep supervision from the data set's masks; 0 = labels only, no masks "
                             "needed; default: 1.0)")
    parser.add_argument("--arch-kwargs", type=json.loads, default=None,
                        help='builder arguments as JSON, e.g. \'{"base_channels": 16, "depth": 3}\'')


def run(args: argparse.Namespace) -> int:
    from visionserve.export.train import TrainConfig, train

    config = TrainConfig(task=args.task, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, threads=args.threads, arch_kwargs=args.arch_kwargs,
                         aux_mask_weight=args.aux_mask_weight)

    def show(record: dict) -> None:
        metric = (f"accuracy {record['accuracy']:.4f}" if "accuracy" in record
                  else f"mIoU {record['miou']:.4f}")
        print(f"epoch {record['epoch']:>3}  loss {record['loss']:.4f}  held-out {metric}  "
              f"{record['seconds']:.0f} s", flush=True)

    metadata = train(config, args.data, args.val, args.out, on_epoch=show)
    metrics = metadata["metrics"]
    if "iou" in metrics:
        print("per-class IoU: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["iou"].items()))
    print(f"wrote {args.out / 'model.pth'} and model.json in {metrics['train_seconds']:.0f} s")
    return 0
