"""The tile grid, stitching and the oversized-image policy (pure functions)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from visionserve.server.errors import ResourceExhausted
from visionserve.server.model_config import InputSpec, ReceptiveField
from visionserve.server.tiling import (
    axis_cuts,
    axis_origins,
    cut_tile,
    paste,
    plan_image,
    tile_margin,
    tile_plan,
    tile_size,
    tiling_caveat,
)

LADDER = (32, 48, 64, 96, 128, 192, 256, 384, 512)
UNET = ReceptiveField(size=103, radius=51, stride=8)


def _spec(**fields: object) -> InputSpec:
    base = {"mode": "pad", "buckets": LADDER, "receptive_field": UNET}
    return InputSpec(**(base | fields))


@pytest.mark.parametrize(
    ("length", "tile", "margin", "align"),
    [(100, 512, 56, 8), (512, 512, 56, 8), (513, 512, 56, 8), (1024, 512, 56, 8),
     (1536, 512, 56, 8), (2000, 512, 56, 8), (3001, 512, 56, 8), (777, 128, 32, 16),
     (10_000, 512, 128, 32), (700, 256, 0, 1), (1000, 96, 8, 8)],
)
def test_axis_grid_covers_every_pixel_away_from_inner_edges(length: int, tile: int, margin: int,
                                                            align: int) -> None:
    origins = axis_origins(length, tile, margin, align)
    cuts = axis_cuts(length, origins, tile)
    assert all(o % align == 0 for o in origins)
    assert list(origins) == sorted(set(origins)) and origins[0] == 0
    # the last tile reaches the edge, past it by less than a stride
    assert length <= origins[-1] + tile < max(length, tile) + align
    # kept regions tile [0, length) exactly, each inside its tile, margin from inner edges
    assert cuts[0] == 0 and cuts[-1] == length and list(cuts) == sorted(cuts)
    for k, origin in enumerate(origins):
        lo, hi = cuts[k], cuts[k + 1]
        assert origin <= lo < hi <= origin + tile
        if k > 0:
            assert lo - origin >= margin
        if k + 1 < len(origins):
            assert origin + tile - hi >= margin


def test_axis_grid_refuses_a_margin_that_leaves_no_step() -> None:
    with pytest.raises(ValueError, match="no room"):
        axis_origins(1000, 64, 30, 8)


@pytest.mark.parametrize(("height", "width"), [(1024, 1536), (2000, 3000), (513, 4000), (300, 900)])
def test_stitching_crops_back_gives_the_image(height: int, width: int) -> None:
    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    plan = tile_plan(height, width, _spec())
    canvas = np.zeros_like(image)
    for index, (y, x) in enumerate(plan.origins()):
        tile = cut_tile(image, plan, y, x)
        assert tile.shape == (plan.tile, plan.tile, 3)
        paste(canvas, tile, plan, index)
    np.testing.assert_array_equal(canvas, image)


def test_tiles_beyond_the_edge_repeat_the_edge_pixels() -> None:
    image = np.arange(600 * 20 * 3, dtype=np.uint32).reshape(600, 20, 3).astype(np.uint8)
    plan = tile_plan(600, 20, _spec())
    tile = cut_tile(image, plan, plan.ys[-1], 0)
    np.testing.assert_array_equal(tile[:, 20:], np.repeat(tile[:, 19:20], plan.tile - 20, axis=1))


def test_defaults_from_the_receptive_field() -> None:
    spec = _spec()
    assert tile_size(spec) == 512
    assert tile_margin(spec, 512) == 56  # radius 51 rounded up to the stride 8
    assert tile_margin(_spec(receptive_field=ReceptiveField(435, 217, 32)), 512) == 128  # capped
    assert tile_margin(_spec(receptive_field=None), 256) == 64  # unknown: a quarter tile
    assert tile_margin(_spec(tile_margin=0), 512) == 0
    assert tile_size(_spec(buckets=(64, 768, 1024))) == 64
    assert tile_size(_spec(tile_size=256)) == 256


def test_a_margin_short_of_the_receptive_field_is_named() -> None:
    assert tiling_caveat(_spec()) is None  # UNet: margin 56 >= radius 51
    vgg = ReceptiveField(423, 211, 32)  # SegNet-VGG-16-BN: the default margin is capped at 128
    caveat = tiling_caveat(_spec(receptive_field=vgg))
    assert caveat is not None and "overlap by 128 px" in caveat and "radius of 211" in caveat
    assert "input.tile_margin: 224" in caveat
    assert tiling_caveat(_spec(receptive_field=vgg, tile_margin=224, tile_size=1024)) is None
    assert "no receptive field" in tiling_caveat(_spec(receptive_field=None))
    assert tiling_caveat(_spec(receptive_field=vgg, oversized="scale")) is None
    assert tiling_caveat(_spec(mode="resize", height=64, width=64, receptive_field=vgg)) is None


def test_plan_counts_tiles_of_the_issue_sizes() -> None:
    spec = _spec()
    assert plan_image(1024, 1536, spec).tiles.count == 3 * 4
    assert plan_image(2000, 3000, spec).tiles.count == 5 * 8
    assert plan_image(10_000, 10_000, spec).tiles.count == 25 * 25


def test_images_within_the_largest_bucket_are_served_as_before() -> None:
    served = plan_image(500, 130, _spec())
    assert (served.mode, served.bucket, served.tiles) == ("bucket", (512, 192), None)


def test_oversized_policies() -> None:
    scaled = plan_image(1024, 2048, _spec(oversized="scale"))
    assert (scaled.mode, scaled.scale, scaled.bucket) == ("scaled", 0.25, (256, 512))
    assert "scaled by 0.250" in scaled.describe()
    with pytest.raises(ResourceExhausted, match=r"1024x2048.*at most 512x512.*reject"):
        plan_image(1024, 2048, _spec(oversized="reject"))
    with pytest.raises(ResourceExhausted, match=r"625 tiles.*limit of 600"):
        plan_image(10_000, 10_000, _spec(max_tiles=600))
    tiled = plan_image(1024, 1536, replace(_spec(), tile_margin=16))
    assert tiled.describe() == "tiled: 12 tiles of 512x512, margin 16"


def test_input_spec_checks_the_tiling_fields() -> None:
    with pytest.raises(ValueError, match="oversized"):
        _spec(oversized="crop")
    with pytest.raises(ValueError, match="max_tiles"):
        _spec(max_tiles=0)
    assert _spec(receptive_field={"size": 7, "radius": 3, "stride": 1}).receptive_field == ReceptiveField(7, 3, 1)
