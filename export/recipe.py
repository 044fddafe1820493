"""The training recipes: per-task defaults of ``visionserve train``, chosen by measurement.

Torch-free, so the command line can show them in ``--help`` without importing torch.
How the segmentation recipe was chosen: README "Measured" and ``bench/train_spread.py``.
"""

from __future__ import annotations

from typing import Any

LOSSES = ("ce", "soft-iou", "ce+soft-iou")

# Segmentation quality floor of `train` and `demo`: a class whose held-out IoU ends below it fails the run.
DEFAULT_MIN_CLASS_IOU = 0.5

# Classification: measured on 3000 generated 96x96 images (held out: 300, another seed), 2 CPU cores.
# ResNet width 32 (stages 32..256 channels) instead of 64: 83 s instead of 270 s for 6 epochs,
# held-out accuracy 0.970-0.980 instead of 0.993; width 16: 39 s, 0.853 (2026-12-03).
# Segmentation: ce+soft-iou without class weighting left the triangle at IoU 0.000 (mIoU 0.60)
# after 12 epochs on 1200 64x64 images (seed 0, 1 thread); with class-weighted cross-entropy,
# all else equal, every class >= 0.82 (mIoU 0.90). Old recipe (ce+dice, 4 epochs) for the
# demo: triangle 0.000 on another CPU (issue #12). 6 epochs: more steps, within the demo's budget;
# 4 epochs left the triangle at 0.295 (seed 0, 2 threads). Training on random 64x64 crops ("crop")
# halves a step but the shapes lose context: triangle 0.120 after 6 epochs (2026-12-03).
# Progressive resizing ("coarse_epochs": the first epochs on images downsampled 2x, a quarter of
# the compute) keeps the context: seed 0, 1 thread, 6 epochs of which 3 coarse: mIoU 0.956,
# triangle 0.920; 4 coarse: 0.940, triangle 0.886; 4 coarse of 7: 0.955, 0.927 (all full: 0.953,
# 0.913). 4 of 6: the demo's segmenter in about half the time; its spread: README "Measured".
# For the classifier 3 coarse of 6 cost accuracy (0.923 vs 0.970), so it trains at full size.
DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"epochs": 6, "lr": 3e-3, "arch_kwargs": {"width": 32}, "loss": "ce",
                       "class_weighting": False, "coarse_epochs": 0},
    "segmentation": {"epochs": 6, "lr": 5e-3, "arch_kwargs": {"base_channels": 8, "depth": 4},
                     "loss": "ce+soft-iou", "class_weighting": True, "crop": 0,
                     "coarse_epochs": 4},
}
