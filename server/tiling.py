"""How an image is served, and the tile grid and stitching of images larger than every bucket.

Pure functions (no threads, no backend), tested on their own (``tests/server/test_tiling.py``).

``plan_image`` decides, for a pad-mode segmenter, how an image of ``height`` x ``width``
is served (``Serving``): within the largest shape bucket, as pad mode always did
(``bucket``); beyond it, by the model's ``input.oversized`` policy: ``tile`` (default),
``scale`` (scaled down to the largest bucket, the mask scaled back up), or ``reject``.

Tiles (``TilePlan``) are squares of ``tile`` pixels whose origins lie on multiples of the
model's output stride (``align``), so each tile's pooling grid is the whole image's and
its centre computes what whole-image inference computes there. Consecutive tiles overlap
by at least ``2 * margin``; the last row and column are shifted back to end at the
image's edge, rounded up to the stride (at most ``align - 1`` pixels past the edge, filled
by repeating the edge pixels, as the exported graph pads the whole image). A side shorter
than a tile is padded the same way, as pad mode pads to a bucket. Each output pixel comes
from the tile whose kept region holds it: regions are cut in the middle of each overlap,
so a kept pixel is at least ``margin`` pixels from any tile edge inside the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from visionserve.server.errors import ResourceExhausted
from visionserve.server.model_config import InputSpec, ReceptiveField

DEFAULT_TILE_LIMIT = 512  # default tile: the largest bucket not above this
UNKNOWN_STRIDE = 32  # tile alignment when model.yaml records no receptive field


@dataclass(frozen=True)
class TilePlan:
    """Tiles of ``tile`` x ``tile`` at ``ys`` x ``xs`` (top-left origins) over an image of
    ``height`` x ``width``; tile (i, j) keeps rows ``cuts_y[i]:cuts_y[i + 1]`` and columns
    ``cuts_x[j]:cuts_x[j + 1]`` of the image."""

    height: int
    width: int
    tile: int
    margin: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    cuts_y: tuple[int, ...]
    cuts_x: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def origins(self) -> Iterator[tuple[int, int]]:
        """Tile origins in row-major order (the order of ``keep``'s index)."""
        for y in self.ys:
            for x in self.xs:
                yield y, x

    def keep(self, index: int) -> tuple[slice, slice, slice, slice]:
        """Tile ``index``'s kept region: (image rows, image cols, tile rows, tile cols)."""
        i, j = divmod(index, len(self.xs))
        y0, y1 = self.cuts_y[i], self.cuts_y[i + 1]
        x0, x1 = self.cuts_x[j], self.cuts_x[j + 1]
        oy, ox = self.ys[i], self.xs[j]
        return slice(y0, y1), slice(x0, x1), slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox)


@dataclass(frozen=True)
class Serving:
    """How one image is served: ``mode`` "bucket" (padded to ``bucket``), "tiled"
    (``tiles``), or "scaled" (by ``scale`` < 1, into ``bucket``)."""

    mode: str
    height: int
    width: int
    bucket: tuple[int, int] = (0, 0)
    scale: float = 1.0
    tiles: TilePlan | None = None

    def describe(self) -> str:
        """One line for logs, CSVs and reports."""
        if self.mode == "tiled" and self.tiles is not None:
            t = self.tiles
            return f"tiled: {t.count} tiles of {t.tile}x{t.tile}, margin {t.margin}"
        if self.mode == "scaled":
            return f"scaled by {self.scale:.3f} to fit {self.bucket[0]}x{self.bucket[1]}"
        if self.mode == "resized":
            return f"resized to {self.bucket[0]}x{self.bucket[1]}"
        return f"bucket {self.bucket[0]}x{self.bucket[1]}"


def axis_origins(length: int, tile: int, margin: int, align: int) -> tuple[int, ...]:
    """Tile origins along one axis of ``length`` pixels (see the module docstring)."""
    if length <= tile:
        return (0,)
    step = (tile - 2 * margin) // align * align
    if step < align:
        raise ValueError(
            f"tile {tile} with margin {margin} leaves no room for a step of the stride {align}: "
            f"make the tile larger or the margin smaller"
        )
    last = math.ceil((length - tile) / align) * align
    return (*range(0, last, step), last)


def axis_cuts(length: int, origins: tuple[int, ...], tile: int) -> tuple[int, ...]:
    """Where the kept regions of consecutive tiles meet: the middle of each overlap."""
    inner = [(b + a + tile) // 2 for a, b in zip(origins, origins[1:])]
    return (0, *inner, length)


def tile_size(spec: InputSpec) -> int:
    """``input.tile_size``, or the largest bucket not above 512 (the smallest bucket if all are)."""
    if spec.tile_size is not None:
        return spec.tile_size
    fitting = [b for b in spec.buckets if b <= DEFAULT_TILE_LIMIT]
    return fitting[-1] if fitting else spec.buckets[0]


def tile_align(spec: InputSpec) -> int:
    """Tile origins lie on multiples of this: the model's output stride."""
    field = spec.receptive_field
    return field.stride if field is not None else UNKNOWN_STRIDE


def tile_margin(spec: InputSpec, tile: int) -> int:
    """``input.tile_margin``, or the receptive field's radius rounded up to the stride,
    at most a quarter of the tile (a quarter when no receptive field is recorded)."""
    if spec.tile_margin is not None:
        return spec.tile_margin
    field, cap = spec.receptive_field, tile // 4
    if field is None:
        return cap
    return min(cap, exact_margin(field))


def exact_margin(field: ReceptiveField) -> int:
    """The smallest margin that makes tiles exact: the radius rounded up to the stride."""
    return math.ceil(field.radius / field.stride) * field.stride


def tiling_caveat(spec: InputSpec) -> str | None:
    """Why this model's tiled masks may differ from whole-image inference, or None.

    Tiles are exact when they overlap by at least the receptive field's radius; the
    default margin is capped at a quarter of the tile, so a model seeing farther than that
    (SegNet-VGG-16: radius 211 px, 512 tiles) is tiled with seams unless told otherwise.
    """
    if spec.mode != "pad" or spec.oversized != "tile":
        return None
    tile = tile_size(spec)
    margin, field = tile_margin(spec, tile), spec.receptive_field
    if field is None:
        return (f"no receptive field is recorded (re-export to record one): tiles of "
                f"{tile}x{tile} overlap by {margin} px, which may leave seams in masks of "
                f"images larger than {spec.buckets[-1]}x{spec.buckets[-1]}")
    if margin >= field.radius:
        return None
    return (f"tiles of {tile}x{tile} overlap by {margin} px, less than the receptive field's "
            f"radius of {field.radius} px: masks of images larger than "
            f"{spec.buckets[-1]}x{spec.buckets[-1]} may differ from whole-image inference near "
            f"tile seams; to make them exact set input.tile_margin: {exact_margin(field)} "
            f"(with input.tile_size well above twice that, e.g. {4 * exact_margin(field)})")


def tile_plan(height: int, width: int, spec: InputSpec) -> TilePlan:
    """The tile grid for an image of ``height`` x ``width`` under ``spec``."""
    tile = tile_size(spec)
    margin, align = tile_margin(spec, tile), tile_align(spec)
    ys = axis_origins(height, tile, margin, align)
    xs = axis_origins(width, tile, margin, align)
    return TilePlan(height, width, tile, margin, ys, xs,
                    axis_cuts(height, ys, tile), axis_cuts(width, xs, tile))


def plan_image(height: int, width: int, spec: InputSpec) -> Serving:
    """How a pad-mode model serves an image of ``height`` x ``width`` (pure).

    Raises ``ResourceExhausted`` when the policy is ``reject`` and the image exceeds the
    largest bucket, or when tiling it would take more than ``input.max_tiles`` tiles.
    """
    largest = spec.buckets[-1]
    if height <= largest and width <= largest:
        return Serving("bucket", height, width, (_bucket(height, spec), _bucket(width, spec)))
    if spec.oversized == "reject":
        raise ResourceExhausted(
            f"the image is {height}x{width} (HxW): this model accepts at most {largest}x{largest} "
            f"(input.oversized is 'reject'); send a smaller image"
        )
    if spec.oversized == "scale":
        scale = min(largest / height, largest / width)
        content = (max(1, min(largest, round(height * scale))), max(1, min(largest, round(width * scale))))
        return Serving("scaled", height, width, (_bucket(content[0], spec), _bucket(content[1], spec)), scale)
    plan = tile_plan(height, width, spec)
    if plan.count > spec.max_tiles:
        raise ResourceExhausted(
            f"the image is {height}x{width} (HxW): it would take {plan.count} tiles of "
            f"{plan.tile}x{plan.tile}, more than this model's limit of {spec.max_tiles} "
            f"(input.max_tiles); send a smaller image"
        )
    return Serving("tiled", height, width, (plan.tile, plan.tile), tiles=plan)


def _bucket(side: int, spec: InputSpec) -> int:
    return next(b for b in spec.buckets if b >= side)


def cut_tile(image: np.ndarray, plan: TilePlan, y: int, x: int) -> np.ndarray:
    """The ``tile`` x ``tile`` crop of ``image`` at (y, x); beyond the image's bottom or right
    edge, the edge pixels repeated."""
    crop = image[y : y + plan.tile, x : x + plan.tile]
    bottom, right = plan.tile - crop.shape[0], plan.tile - crop.shape[1]
    if bottom or right:
        crop = cv2.copyMakeBorder(crop, 0, bottom, 0, right, cv2.BORDER_REPLICATE)
    return crop


def paste(canvas: np.ndarray, tile_mask: np.ndarray, plan: TilePlan, index: int) -> None:
    """Write tile ``index``'s kept region of ``tile_mask`` into ``canvas`` (the image-sized mask)."""
    rows, cols, tile_rows, tile_cols = plan.keep(index)
    canvas[rows, cols] = tile_mask[tile_rows, tile_cols]
