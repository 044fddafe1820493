"""``model.yaml``: what a model repository entry says about its model.

Written by ``visionserve export``, read by the server. Checked at construction, with
messages that say how to fix the file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from visionserve.server.atomic import write_atomic
from visionserve.server.backends.registry import BACKEND_NAMES

TASKS = ("classification", "segmentation")
MAX_SEGMENTATION_CLASSES = 255  # masks are uint8 class indices


def check_class_count(task: str, count: int) -> None:
    """``ValueError`` unless ``count`` class names fit ``task`` (2 or more; a segmenter's
    uint8 masks hold at most ``MAX_SEGMENTATION_CLASSES``)."""
    if count < 2:
        raise ValueError(f"labels needs at least 2 class names, got {count}")
    if task == "segmentation" and count > MAX_SEGMENTATION_CLASSES:
        raise ValueError(
            f"segmentation masks are uint8: at most {MAX_SEGMENTATION_CLASSES} classes, "
            f"got {count} labels"
        )
PRECISIONS = ("fp32", "fp16")
# cuDNN's convolution algorithm choice on ONNX Runtime CUDA. EXHAUSTIVE benchmarks every
# algorithm for every new input shape (0.3-1.3 s per shape, reported 634 ms against 1.9 ms
# with HEURISTIC); a served model sees many shapes (batch sizes x shape buckets), so the
# default asks cuDNN's heuristics instead. EXHAUSTIVE suits a model served at few shapes.
CUDNN_CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def check_backends(backends: tuple[str, ...]) -> None:
    """``ValueError`` unless ``backends`` is a non-empty list of known backend names."""
    unknown = [b for b in backends if b not in BACKEND_NAMES]
    if unknown or not backends:
        raise ValueError(
            f"backends must be a non-empty list from {BACKEND_NAMES}, got {list(backends)}"
        )


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max of each dynamic dimension. The TensorRT build and the batcher read it."""

    batch: tuple[int, int, int] = (1, 8, 32)
    height: tuple[int, int, int] | None = None  # None: fixed by the model's input size
    width: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for dim in ("batch", "height", "width"):
            value = getattr(self, dim)
            if value is None:
                continue
            value = tuple(int(v) for v in value)
            object.__setattr__(self, dim, value)
            if len(value) != 3 or not 1 <= value[0] <= value[1] <= value[2]:
                raise ValueError(
                    f"profile.{dim} must be [min, opt, max] with 1 <= min <= opt <= max, got {list(value)}"
                )


INPUT_MODES = ("resize", "pad", "resize_crop")
# torchvision's classification eval transforms: Resize(256) + CenterCrop(224)
RESIZE_CROP_RATIO = 256 / 224
OVERSIZED_POLICIES = ("tile", "scale", "reject")


@dataclass(frozen=True)
class ReceptiveField:
    """What an output pixel sees, computed from the ONNX graph at export
    (``export/receptive_field.py``): ``size`` and ``radius`` in input pixels (an output
    pixel depends on input pixels at most ``radius`` away on each axis), ``stride`` the
    largest stride of any feature map (tiles start on multiples of it)."""

    size: int
    radius: int
    stride: int

    def __post_init__(self) -> None:
        for key in ("size", "radius", "stride"):
            object.__setattr__(self, key, int(getattr(self, key)))
        if self.size < 1 or self.radius < 0 or self.stride < 1:
            raise ValueError(
                f"input.receptive_field needs size >= 1, radius >= 0, stride >= 1, got {self}"
            )


@dataclass(frozen=True)
class InputSpec:
    """The image tensor the model takes: NCHW float32, RGB, (pixel/255 - mean) / std.

    ``mode`` says how an image of any size becomes that tensor on the visionserve.v1 path:

    - ``resize``: resized to ``height`` x ``width`` (fixed-size models, classifiers);
    - ``pad``: kept at its own resolution and padded (edge pixels repeated) up to a
      shape bucket: height and width each round up to the next of ``buckets``, so
      images of nearby sizes share a tensor shape and batch together; the mask is
      cropped back. An image larger than the largest bucket is first scaled down (aspect
      kept) to fit it. For segmenters with a dynamic H, W (``profile.height/width``).
    - ``resize_crop``: torchvision's eval transforms (classifiers trained with them):
      the short side resized to ``resize_size`` (bilinear, antialiased), then the centre
      ``height`` x ``width`` cropped. ``resize_size`` defaults to ``height``, ``width``'s
      larger side x 256 / 224 (Resize(256) + CenterCrop(224) scaled to the input size).

    Pad mode, images larger than the largest bucket (``oversized``): ``tile`` (default)
    cuts them into overlapping tiles of ``tile_size`` (default: the largest bucket not
    above 512) that overlap by ``tile_margin`` (default: the receptive field's radius
    rounded up to its stride, at most a quarter of the tile), at most ``max_tiles`` per
    image; ``scale`` scales them down to fit (the mask scaled back up); ``reject``
    refuses them. ``server/tiling.py`` has the geometry.
    """

    name: str = "image"
    height: int = 96
    width: int = 96
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mode: str = "resize"
    buckets: tuple[int, ...] = ()  # pad mode: bucket sides in pixels (default: from the profile)
    resize_size: int | None = None  # resize_crop mode: the short side before the crop
    receptive_field: ReceptiveField | None = None  # recorded by export
    oversized: str = "tile"
    tile_size: int | None = None
    tile_margin: int | None = None
    max_tiles: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.receptive_field, dict):
            object.__setattr__(self, "receptive_field", ReceptiveField(**self.receptive_field))
        if self.oversized not in OVERSIZED_POLICIES:
            raise ValueError(
                f"input.oversized must be one of {OVERSIZED_POLICIES}, got {self.oversized!r}"
            )
        if self.tile_size is not None and self.tile_size < 16:
            raise ValueError(f"input.tile_size must be at least 16 pixels, got {self.tile_size}")
        if self.tile_margin is not None and self.tile_margin < 0:
            raise ValueError(f"input.tile_margin must be >= 0, got {self.tile_margin}")
        if self.max_tiles < 1:
            raise ValueError(f"input.max_tiles must be at least 1, got {self.max_tiles}")
        if self.height < 1 or self.width < 1:
            raise ValueError(
                f"input.height and input.width must be positive, got {self.height}x{self.width}"
            )
        if self.mode not in INPUT_MODES:
            raise ValueError(f"input.mode must be one of {INPUT_MODES}, got {self.mode!r}")
        self._check_resize_size()
        buckets = tuple(int(b) for b in self.buckets)
        object.__setattr__(self, "buckets", buckets)
        if list(buckets) != sorted(set(buckets)) or any(b < 1 for b in buckets):
            raise ValueError(
                f"input.buckets must be positive sides in increasing order, got {list(buckets)}"
            )
        for key in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, key))
            object.__setattr__(self, key, value)
            if len(value) != 3:
                raise ValueError(f"input.{key} needs 3 values (R, G, B), got {list(value)}")
        if any(s <= 0 or not math.isfinite(s) for s in self.std):
            raise ValueError(f"input.std values must be positive, got {list(self.std)}")

    def _check_resize_size(self) -> None:
        """resize_crop: ``resize_size`` (default from the 256/224 ratio) covers the crop."""
        if self.mode != "resize_crop":
            if self.resize_size is not None:
                raise ValueError(
                    f"input.resize_size ({self.resize_size}) is used by input.mode "
                    f"'resize_crop' only, and the mode is {self.mode!r}: remove it or set "
                    f"input.mode: resize_crop"
                )
            return
        crop = max(self.height, self.width)
        size = self.resize_size if self.resize_size is not None else round(crop * RESIZE_CROP_RATIO)
        object.__setattr__(self, "resize_size", int(size))
        if size < crop:
            raise ValueError(
                f"input.resize_size must be at least the crop's larger side {crop} "
                f"(input.height x input.width {self.height}x{self.width}), got {size}"
            )


def bucket_ladder(low: int, high: int) -> tuple[int, ...]:
    """Bucket sides from ``low`` to ``high``: ``low``, then 2^k and 1.5 * 2^k, then ``high``
    (so an image is padded by at most half its side, and usually much less)."""
    if not 1 <= low <= high:
        raise ValueError(f"bucket_ladder needs 1 <= low <= high, got {low}, {high}")
    sides = {low, high}
    power = 1
    while power <= high:
        sides.update(s for s in (power, power * 3 // 2) if low <= s <= high)
        power *= 2
    return tuple(sorted(sides))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    task: str
    labels: tuple[str, ...]
    input: InputSpec = field(default_factory=InputSpec)
    # ONNX output names by role: classification uses "logits"/"probabilities",
    # segmentation uses "mask" (per-pixel class index).
    outputs: dict[str, str] = field(default_factory=dict)
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    max_batch_size: int = 8
    max_queue_delay_ms: float = 2.0
    # Dynamic batcher: worker threads running batches in parallel (Triton's instance
    # count) and the bound on waiting requests (past it: RESOURCE_EXHAUSTED).
    instances: int = 1
    max_queue_size: int = 128
    backends: tuple[str, ...] = ("onnxruntime-cpu",)
    # CUDA device index for the GPU backends (tensorrt, onnxruntime-cuda).
    device: int = 0
    # ONNX Runtime backends: "fp16" serves model.fp16.onnx (`visionserve build
    # --fp16-onnx-only` writes and validates it) instead of model.onnx.
    precision: str = "fp32"
    cudnn_conv_algo_search: str = "HEURISTIC"
    ignore_index: int = 255
    # Free text for people reading model.yaml (e.g. what an imported model can and cannot
    # do); the server does not read it.
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        object.__setattr__(self, "backends", tuple(self.backends))
        notes = (self.notes,) if isinstance(self.notes, str) else self.notes
        object.__setattr__(self, "notes", tuple(str(x) for x in notes))
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        check_class_count(self.task, len(self.labels))
        needed = "mask" if self.task == "segmentation" else "probabilities"
        if needed not in self.outputs:
            raise ValueError(
                f"outputs must name the ONNX output for {needed!r} ({self.task}), got {self.outputs}"
            )
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.instances < 1:
            raise ValueError(f"instances must be at least 1, got {self.instances}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        check_backends(self.backends)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCHES:
            raise ValueError(
                f"cudnn_conv_algo_search must be one of {CUDNN_CONV_ALGO_SEARCHES}, "
                f"got {self.cudnn_conv_algo_search!r}"
            )
        if self.device < 0:
            raise ValueError(f"device must be >= 0 (a CUDA device index), got {self.device}")
        self._check_buckets()
        if self.input.mode == "resize_crop" and self.task != "classification":
            raise ValueError(
                "input.mode 'resize_crop' crops the image, so a mask would not cover it: it "
                "is for classifiers; use 'pad' or 'resize' for a segmenter"
            )
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"ignore_index must be in 0..255, got {self.ignore_index}")

    def _check_buckets(self) -> None:
        """Pad mode needs a dynamic H, W; buckets default to a ladder over the profile."""
        spec, profile = self.input, self.profile
        if spec.mode != "pad":
            return
        if profile.height is None or profile.width is None:
            raise ValueError(
                "input.mode 'pad' needs a model with a dynamic height and width "
                "(profile.height and profile.width); use input.mode 'resize'"
            )
        low = max(profile.height[0], profile.width[0])
        high = min(profile.height[2], profile.width[2])
        if not spec.buckets:
            object.__setattr__(self, "input", replace(spec, buckets=bucket_ladder(low, high)))
            self._check_tiles()
            return
        outside = [b for b in spec.buckets if not low <= b <= high]
        if outside:
            raise ValueError(
                f"input.buckets {outside} lie outside the profile's height and width range "
                f"{low}..{high}"
            )
        self._check_tiles()

    def _check_tiles(self) -> None:
        """The tile fits the largest bucket and leaves a step between tiles."""
        from visionserve.server.tiling import tile_plan  # tiling reads InputSpec

        spec = self.input
        if spec.tile_size is not None and spec.tile_size > spec.buckets[-1]:
            raise ValueError(
                f"input.tile_size {spec.tile_size} exceeds the largest bucket {spec.buckets[-1]}"
            )
        big = 4 * spec.buckets[-1]
        tile_plan(big, big, spec)  # ValueError naming the tile and margin when no step is left

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def max_input_shape(self) -> tuple[int, int, int, int]:
        """The largest input tensor the server sends: ``max_batch_size`` rows at the largest
        bucket (pad mode) or at the input size (resize mode). A backend with a fixed
        capacity (a TensorRT engine's profile) must take it, or be refused at load."""
        spec = self.input
        side = max(spec.buckets) if spec.mode == "pad" else None
        height, width = (side, side) if side else (spec.height, spec.width)
        return (self.max_batch_size, 3, height, width)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        try:
            data["input"] = InputSpec(**data.get("input", {}))
            data["profile"] = ShapeProfile(**data.get("profile", {}))
            return cls(**data)
        except TypeError as exc:  # unknown or missing keys
            raise ValueError(f"model.yaml: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["backends"] = list(self.backends)
        data["input"]["mean"] = list(self.input.mean)
        data["input"]["std"] = list(self.input.std)
        data["input"]["buckets"] = list(self.input.buckets)
        if self.input.resize_size is None:  # resize_crop only: other entries stay as they were
            del data["input"]["resize_size"]
        if self.notes:
            data["notes"] = list(self.notes)
        else:  # only models that say something carry the key
            del data["notes"]
        data["profile"] = {
            k: (list(v) if v is not None else None) for k, v in data["profile"].items()
        }
        return data

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write (atomically replace) ``path`` with this config as YAML."""
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
