"""``visionserve train``: train the demo ResNet classifier or UNet segmenter on a data set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visionserve.commands._args import existing_dir
from visionserve.export.recipe import DEFAULT_MIN_CLASS_IOU, DEFAULTS, LOSSES

NAME = "train"
HELP = "Train the demo ResNet classifier or UNet segmenter on a data set"


def _by_task(key: str) -> str:
    return ", ".join(f"{value[key]} {task}" for task, value in DEFAULTS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("classification", "segmentation"), required=True)
    parser.add_argument("--data", type=existing_dir, required=True, help="training data set directory")
    parser.add_argument("--val", type=existing_dir, required=True,
                        help="held-out data set directory (evaluated after every epoch)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory (model.pth + model.json)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs (default: {_by_task('epochs')})")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak one-cycle learning rate (default: {_by_task('lr')})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--aux-mask-weight", type=float, default=1.0,
                        help="classification: weight of the auxiliary mask loss on ResNet layer3 "
                             "(deep supervision from the data set's masks; 0 = labels only, no masks "
                             "needed; default: 1.0)")
    parser.add_argument("--arch-kwargs", type=json.loads, default=None,
                        help='builder arguments as JSON, e.g. \'{"base_channels": 16, "depth": 3}\'')
    parser.add_argument("--loss", choices=LOSSES, default=None,
                        help="segmentation loss: cross-entropy, soft IoU (Jaccard over softmax "
                             "probabilities, per class, mean over present classes) or their sum "
                             f"(default: {DEFAULTS['segmentation']['loss']})")
    parser.add_argument("--class-weighting", action=argparse.BooleanOptionalAction, default=None,
                        help="segmentation: weigh cross-entropy by inverse square-root class pixel "
                             f"frequency (default: {'on' if DEFAULTS['segmentation']['class_weighting'] else 'off'})")
    parser.add_argument("--crop", type=int, default=None,
                        help="segmentation: train on random CROP x CROP windows of each image (held-out "
                             "evaluation sees whole images; 0 = whole images; default: "
                             f"{DEFAULTS['segmentation']['crop']})")
    parser.add_argument("--coarse-epochs", type=int, default=None,
                        help="train the first N epochs on images downsampled 2x (progressive resizing: a "
                             "quarter of the compute per step; the last epoch is always at full size; "
                             f"default: {_by_task('coarse_epochs')}, leaving at least two full-size epochs "
                             "when --epochs is lower than the default)")
    parser.add_argument("--min-class-iou", type=float, default=DEFAULT_MIN_CLASS_IOU,
                        help="segmentation quality floor: exit 1, naming the class, when any class's "
                             "held-out IoU ends below it; the checkpoint is still written "
                             f"(default: {DEFAULT_MIN_CLASS_IOU}; 0 disables)")


def run(args: argparse.Namespace) -> int:
    from visionserve.export.train import TrainConfig, classes_below, train

    config = TrainConfig(task=args.task, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, threads=args.threads, arch_kwargs=args.arch_kwargs,
                         aux_mask_weight=args.aux_mask_weight, loss=args.loss,
                         class_weighting=args.class_weighting, crop=args.crop,
                         coarse_epochs=args.coarse_epochs)

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
    below = classes_below(metrics, args.min_class_iou) if args.min_class_iou > 0 else {}
    if below:
        named = ", ".join(f"{name} {value:.4f}" for name, value in below.items())
        print(f"quality floor: held-out IoU below --min-class-iou {args.min_class_iou} for {named}; "
              "train longer, with another --seed or a wider model (--arch-kwargs), or lower the floor",
              file=sys.stderr)
        return 1
    return 0
