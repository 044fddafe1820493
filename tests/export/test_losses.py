"""The soft IoU loss against IoU computed independently (server/iou.py, numpy), its gradients,
ignore_index, and the loss registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from visionserve.export.losses import class_weights, segmentation_loss, soft_iou_loss
from visionserve.server.iou import compute_iou

NUM_CLASSES = 4


def _one_hot_logits(pred: np.ndarray, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Logits whose softmax is one-hot to float precision (exp(-200) underflows to 0)."""
    onehot = torch.nn.functional.one_hot(torch.from_numpy(pred).long(), num_classes).permute(0, 3, 1, 2)
    return onehot.float() * 200.0


def _random_masks(seed: int, shape: tuple[int, ...] = (3, 9, 11), classes: int = NUM_CLASSES
                  ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, classes, shape).astype(np.uint8),
            rng.integers(0, classes, shape).astype(np.uint8))


@pytest.mark.parametrize("seed", range(5))
def test_equals_one_minus_iou_for_one_hot_predictions(seed: int) -> None:
    pred, truth = _random_masks(seed)
    truth[0, :3] = 255  # ignored pixels
    # the batch scored as one data set: masks stacked into one image
    expected = 1.0 - compute_iou(pred.reshape(-1, pred.shape[-1]), truth.reshape(-1, truth.shape[-1]),
                                 NUM_CLASSES, ignore_index=255).mean_iou
    loss = soft_iou_loss(_one_hot_logits(pred), torch.from_numpy(truth).long())
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_absent_and_predicted_only_classes_follow_the_iou_conventions() -> None:
    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, :2] = 1  # classes 0 and 1 in the truth; 2 only predicted; 3 in neither
    pred = truth.copy()
    pred[0, 0, 0] = 2
    loss = soft_iou_loss(_one_hot_logits(pred), torch.from_numpy(truth).long())
    # class 0: 8/8, class 1: 7/8, class 2: 0/1, class 3 absent -> mean over three classes
    assert loss.item() == pytest.approx(1.0 - (1.0 + 7 / 8 + 0.0) / 3, abs=1e-6)
    perfect = soft_iou_loss(_one_hot_logits(truth), torch.from_numpy(truth).long())
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)


def test_ignore_index_pixels_do_not_count() -> None:
    pred, truth = _random_masks(7)
    logits = torch.randn(pred.shape[0], NUM_CLASSES, *pred.shape[1:], generator=torch.Generator().manual_seed(0))
    target = torch.from_numpy(truth).long()
    ignored = target.clone()
    ignored[:, :4] = 255
    loss = soft_iou_loss(logits, ignored)
    # the same loss as on the valid pixels alone, whatever the logits at ignored pixels are
    changed = logits.clone()
    changed[:, :, :4] = torch.randn_like(changed[:, :, :4]) * 50
    assert soft_iou_loss(changed, ignored).item() == pytest.approx(loss.item(), abs=1e-6)
    assert loss.item() != pytest.approx(soft_iou_loss(logits, target).item(), abs=1e-4)
    # and it matches the loss of the valid rows cropped out
    assert soft_iou_loss(logits[:, :, 4:], target[:, 4:]).item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["soft-iou", "ce+soft-iou", "ce"])
def test_gradients_are_finite_and_nonzero(name: str) -> None:
    _, truth = _random_masks(3)
    target = torch.from_numpy(truth).long()
    target[0] = 255  # a fully ignored image in the batch
    for scale in (1.0, 100.0):  # also with saturated softmax
        logits = (torch.randn(3, NUM_CLASSES, 9, 11, generator=torch.Generator().manual_seed(1))
                  * scale).requires_grad_()
        loss = segmentation_loss(name)(logits, target)
        loss.backward()
        assert math.isfinite(loss.item())
        assert torch.isfinite(logits.grad).all()
        assert logits.grad[1:].abs().sum() > 0
        assert logits.grad[0].abs().sum() == 0  # ignored pixels get no gradient


def test_all_pixels_ignored_gives_zero_with_a_gradient_path() -> None:
    logits = torch.randn(1, NUM_CLASSES, 3, 3, requires_grad=True)
    loss = soft_iou_loss(logits, torch.full((1, 3, 3), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_out_of_range_target_is_refused() -> None:
    with pytest.raises(ValueError, match="outside 0..3"):
        soft_iou_loss(torch.zeros(1, NUM_CLASSES, 2, 2), torch.full((1, 2, 2), 7))


def test_soft_iou_lowers_when_predictions_move_towards_the_truth() -> None:
    _, truth = _random_masks(4)
    target = torch.from_numpy(truth).long()
    good = _one_hot_logits(truth) / 50  # soft, right
    bad = torch.zeros_like(good)  # uniform
    assert soft_iou_loss(good, target) < soft_iou_loss(bad, target)


def test_class_weights_favour_rare_classes_and_skip_missing_ones() -> None:
    masks = torch.zeros(1, 10, 10, dtype=torch.uint8)
    masks[0, 0, :4] = 1  # 4 pixels of class 1, 96 of class 0, none of class 2
    masks[0, 9, 9] = 255
    weights = class_weights(masks, 3)
    assert weights[2] == 0 and weights[1] > weights[0] > 0
    assert weights[:2].mean().item() == pytest.approx(1.0)


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="loss must be one of"):
        segmentation_loss("dice")
