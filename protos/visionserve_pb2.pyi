from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MaskFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_FORMAT_PNG: _ClassVar[MaskFormat]
    MASK_FORMAT_RAW: _ClassVar[MaskFormat]
MASK_FORMAT_PNG: MaskFormat
MASK_FORMAT_RAW: MaskFormat

class RawImage(_message.Message):
    __slots__ = ("data", "height", "width", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("data", "height", "width", "format")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    format: MaskFormat
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., format: _Optional[_Union[MaskFormat, str]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "image", "top_k", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    image: Image
    top_k: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "request_id", "top")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    request_id: str
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., request_id: _Optional[str] = ..., top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("model", "version", "image", "ground_truth", "ignore_index", "mask_format", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    image: Image
    ground_truth: Mask
    ignore_index: int
    mask_format: MaskFormat
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., ground_truth: _Optional[_Union[Mask, _Mapping]] = ..., ignore_index: _Optional[int] = ..., mask_format: _Optional[_Union[MaskFormat, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ClassIoU(_message.Message):
    __slots__ = ("index", "label", "intersection", "union", "iou", "present")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INTERSECTION_FIELD_NUMBER: _ClassVar[int]
    UNION_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    intersection: int
    union: int
    iou: float
    present: bool
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., intersection: _Optional[int] = ..., union: _Optional[int] = ..., iou: _Optional[float] = ..., present: _Optional[bool] = ...) -> None: ...

class IoUReport(_message.Message):
    __slots__ = ("classes", "mean_iou", "pixel_accuracy", "scored_pixels", "ignore_index")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MEAN_IOU_FIELD_NUMBER: _ClassVar[int]
    PIXEL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCORED_PIXELS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[ClassIoU]
    mean_iou: float
    pixel_accuracy: float
    scored_pixels: int
    ignore_index: int
    def __init__(self, classes: _Optional[_Iterable[_Union[ClassIoU, _Mapping]]] = ..., mean_iou: _Optional[float] = ..., pixel_accuracy: _Optional[float] = ..., scored_pixels: _Optional[int] = ..., ignore_index: _Optional[int] = ...) -> None: ...

class SegmentBatch(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SegmentRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SegmentRequest, _Mapping]]] = ...) -> None: ...

class SegmentBatchResult(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SegmentResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[SegmentResponse, _Mapping]]] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("model", "version", "request_id", "mask", "iou", "error_code", "error_message", "serving")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    request_id: str
    mask: Mask
    iou: IoUReport
    error_code: int
    error_message: str
    serving: Serving
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., request_id: _Optional[str] = ..., mask: _Optional[_Union[Mask, _Mapping]] = ..., iou: _Optional[_Union[IoUReport, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., serving: _Optional[_Union[Serving, _Mapping]] = ...) -> None: ...

class Serving(_message.Message):
    __slots__ = ("mode", "image_height", "image_width", "bucket_height", "bucket_width", "tiles", "tile_margin", "scale", "description")
    MODE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    BUCKET_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    TILE_MARGIN_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    mode: str
    image_height: int
    image_width: int
    bucket_height: int
    bucket_width: int
    tiles: int
    tile_margin: int
    scale: float
    description: str
    def __init__(self, mode: _Optional[str] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., bucket_height: _Optional[int] = ..., bucket_width: _Optional[int] = ..., tiles: _Optional[int] = ..., tile_margin: _Optional[int] = ..., scale: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "task", "labels", "input_height", "input_width", "backend", "ignore_index", "max_batch_size", "input_mode", "buckets", "device", "precision", "receptive_field", "receptive_field_radius", "output_stride", "oversized", "tile_size", "tile_margin", "max_tiles")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUT_MODE_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_RADIUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_STRIDE_FIELD_NUMBER: _ClassVar[int]
    OVERSIZED_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TILE_MARGIN_FIELD_NUMBER: _ClassVar[int]
    MAX_TILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    task: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_height: int
    input_width: int
    backend: str
    ignore_index: int
    max_batch_size: int
    input_mode: str
    buckets: _containers.RepeatedScalarFieldContainer[int]
    device: str
    precision: str
    receptive_field: int
    receptive_field_radius: int
    output_stride: int
    oversized: str
    tile_size: int
    tile_margin: int
    max_tiles: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., task: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., backend: _Optional[str] = ..., ignore_index: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., input_mode: _Optional[str] = ..., buckets: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., receptive_field: _Optional[int] = ..., receptive_field_radius: _Optional[int] = ..., output_stride: _Optional[int] = ..., oversized: _Optional[str] = ..., tile_size: _Optional[int] = ..., tile_margin: _Optional[int] = ..., max_tiles: _Optional[int] = ...) -> None: ...
