"""Pre- and post-processing: normalization, layout, top-k, nearest-neighbour masks."""

from __future__ import annotations

import numpy as np
import pytest

from visionserve.server.model_config import InputSpec
from visionserve.server.postprocess import resize_mask, top_k
from visionserve.server.preprocess import preprocess, preprocess_batch, stack


def test_preprocess_normalizes_per_channel_and_is_chw_float32() -> None:
    spec = InputSpec(height=4, width=6, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 0, 51
    x = preprocess(image, spec)
    assert x.dtype == np.float32 and x.shape == (3, 4, 6)
    np.testing.assert_allclose(x[:, 0, 0], [1.0, -1.0, 0.2], rtol=1e-6)


def test_preprocess_resizes_to_the_model_input() -> None:
    spec = InputSpec(height=8, width=16)
    batch = preprocess_batch(
        [np.zeros((5, 7, 3), np.uint8), np.zeros((100, 30, 3), np.uint8)], spec
    )
    assert batch.shape == (2, 3, 8, 16)


def test_stack_refuses_mixed_shapes() -> None:
    with pytest.raises(ValueError, match="different shapes"):
        stack([np.zeros((3, 2, 2), np.float32), np.zeros((3, 2, 3), np.float32)])


def test_top_k_orders_best_first_breaks_ties_by_index_and_caps_k() -> None:
    probabilities = np.array([0.1, 0.4, 0.1, 0.4], np.float32)
    assert [i for i, _ in top_k(probabilities, 3)] == [1, 3, 0]
    assert len(top_k(probabilities, 10)) == 4
    assert top_k(probabilities, 1)[0][1] == pytest.approx(0.4)


def test_resize_mask_keeps_class_values_and_block_layout() -> None:
    mask = np.array([[0, 3], [7, 1]], np.uint8)
    big = resize_mask(mask, 4, 6)
    np.testing.assert_array_equal(big, np.kron(mask, np.ones((2, 3), np.uint8)))
    assert set(np.unique(resize_mask(mask, 13, 9))) <= {0, 1, 3, 7}
