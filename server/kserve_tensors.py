"""KServe v2 tensors in and out of protobuf messages: datatypes, BYTES, outputs, classes.

BYTES tensors use the protocol's standard encoding in ``raw_input_contents`` /
``raw_output_contents``: each element as a 4-byte little-endian length, then its bytes,
elements in row-major order (tritonclient's ``serialize_byte_tensor``). Inputs may come
as ``contents.bytes_contents`` instead.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.server.errors import InvalidArgument
from visionserve.server.postprocess import top_k

DATATYPES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}


def datatype_of(dtype: np.dtype) -> str:
    """The KServe datatype of a numpy dtype (anything else, e.g. object: BYTES)."""
    return DATATYPES.get(np.dtype(dtype), "BYTES")


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """Elements -> the length-prefixed raw encoding of a BYTES tensor."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """The length-prefixed raw encoding of a BYTES tensor -> its elements."""
    items, pos, view = [], 0, memoryview(raw)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument(
                f"BYTES input {name!r} ends inside a length prefix at byte {pos}: expected "
                f"each element as a 4-byte little-endian length followed by that many bytes"
            )
        (size,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + size > len(raw):
            raise InvalidArgument(
                f"BYTES input {name!r}: element {len(items)} claims {size} bytes at byte "
                f"{pos}, but only {len(raw) - pos - 4} follow"
            )
        items.append(bytes(view[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return items


@dataclass(frozen=True)
class InputTensor:
    """One request input with its data: ``raw`` bytes or the typed ``contents``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None
    contents: kpb.InferTensorContents


def request_inputs(request: kpb.ModelInferRequest) -> dict[str, InputTensor]:
    """The request's inputs by name, each with its raw contents when the request uses them."""
    raw = list(request.raw_input_contents)
    if raw and request.inputs and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries ({[len(r) for r in raw]} bytes) for "
            f"{len(request.inputs)} inputs {[t.name for t in request.inputs]}: expected one "
            f"entry per input, in order"
        )
    tensors: dict[str, InputTensor] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise InvalidArgument(f"input {tensor.name!r} is given twice: expected it once")
        if raw and tensor.HasField("contents"):
            raise InvalidArgument(
                f"both raw_input_contents and inputs[{i}].contents are set: send one of them"
            )
        tensors[tensor.name] = InputTensor(
            tensor.name,
            tensor.datatype,
            tuple(tensor.shape),
            raw[i] if raw else None,
            tensor.contents,
        )
    return tensors


def bytes_elements(tensor: InputTensor, max_batch_size: int) -> list[bytes]:
    """A BYTES input of shape [N] (or [N, 1]): its N elements, N in 1..``max_batch_size``."""
    if tensor.datatype != "BYTES":
        raise InvalidArgument(
            f"input {tensor.name!r} has datatype {tensor.datatype!r}: expected 'BYTES' "
            f"(encoded files, one per element)"
        )
    shape = tensor.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidArgument(
            f"input {tensor.name!r} has shape {list(shape)}: expected [N] (or [N, 1]), "
            f"one encoded file per element"
        )
    if not 1 <= shape[0] <= max_batch_size:
        raise InvalidArgument(
            f"input {tensor.name!r} has {shape[0]} elements: expected 1..{max_batch_size} "
            f"(the model's max_batch_size)"
        )
    if tensor.raw is not None:
        items = deserialize_bytes(tensor.raw, tensor.name)
    else:
        items = list(tensor.contents.bytes_contents)
    if len(items) != shape[0]:
        raise InvalidArgument(
            f"input {tensor.name!r} of shape {list(shape)} holds {len(items)} elements: "
            f"expected {shape[0]}"
        )
    return items


def add_output(response: kpb.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append ``array`` to ``response`` as raw contents (object arrays of bytes: BYTES)."""
    if array.dtype == object:
        response.outputs.add(name=name, datatype="BYTES", shape=list(array.shape))
        response.raw_output_contents.append(serialize_bytes(list(array.ravel())))
        return
    array = np.ascontiguousarray(array)
    response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=list(array.shape))
    response.raw_output_contents.append(array.tobytes())


def requested(request: kpb.ModelInferRequest) -> dict[str, int]:
    """Requested output names -> their ``classification`` class count (0: none asked)."""
    wanted: dict[str, int] = {}
    for output in request.outputs:
        count = 0
        if "classification" in output.parameters:
            param = output.parameters["classification"]
            if param.WhichOneof("parameter_choice") != "int64_param" or param.int64_param < 1:
                raise InvalidArgument(
                    f"output {output.name!r}: parameter 'classification' must be a positive "
                    f"int64 (tritonclient's class_count), got {param}".strip()
                )
            count = param.int64_param
        wanted[output.name] = count
    return wanted


def int_parameter(request: kpb.ModelInferRequest, name: str) -> int | None:
    """A request parameter that must be an int64, or None when absent."""
    if name not in request.parameters:
        return None
    param = request.parameters[name]
    if param.WhichOneof("parameter_choice") != "int64_param":
        raise InvalidArgument(f"request parameter {name!r} must be an int64_param, got {param}")
    return int(param.int64_param)


def classification(scores: np.ndarray, class_count: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification extension: [N, C] scores -> [N, k] BYTES ``score:index:label``.

    The ``k = min(class_count, C)`` best classes of each row, best first (ties: the lower
    index), the score written as C's ``%f`` (Triton's ``std::to_string``)."""
    if scores.ndim != 2:
        raise InvalidArgument(
            f"classification needs an output of shape [N, classes], got {list(scores.shape)}"
        )
    out = np.empty((scores.shape[0], min(class_count, scores.shape[1])), dtype=object)
    for row, values in enumerate(scores):
        for col, (index, score) in enumerate(top_k(values, class_count)):
            text = f"{score:f}:{index}" + (f":{labels[index]}" if index < len(labels) else "")
            out[row, col] = text.encode()
    return out
