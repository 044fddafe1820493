"""A corpus of malformed requests, over both protocols: each gets the right status code and a
message saying what was wrong, and the server keeps serving."""

from __future__ import annotations

import struct

import cv2
import grpc
import make_models
import numpy as np
import pytest
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc

SEG, CLS = make_models.SEGMENTER, make_models.CLASSIFIER
INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def png(array: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", array)
    assert ok
    return buffer.tobytes()


IMAGE = pb.Image(encoded=png(np.full((10, 12, 3), 200, np.uint8)))


def infer(
    model: str = CLS,
    shape=(1, 3, 32, 32),
    name: str = "image",
    datatype: str = "FP32",
    raw: list[bytes] | None = None,
    typed: list[float] | None = None,
    outputs: tuple[str, ...] = (),
    version: str = "",
) -> kpb.ModelInferRequest:
    """A ModelInferRequest, by default a valid one for the classifier."""
    request = kpb.ModelInferRequest(model_name=model, model_version=version)
    if name:
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if typed is not None:
        request.inputs[0].contents.fp32_contents.extend(typed)
    if raw is None and typed is None:
        raw = [np.zeros(max(int(np.prod(shape)), 0), "<f4").tobytes()]
    request.raw_input_contents.extend(raw or [])
    for output in outputs:
        request.outputs.add(name=output)
    return request


def bmp_header(width: int, height: int) -> bytes:
    """The first bytes of a BMP claiming ``width`` x ``height`` (no pixel data follows)."""
    return b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<Iii", 40, width, height)


# (id, service, rpc, request, code, message fragment)
CORPUS = [
    # -- KServe v2 ModelInfer ----------------------------------------------------------------
    ("kserve unknown model", "k", "ModelInfer", infer(model="nope"), NF, "unknown model 'nope'"),
    ("kserve unknown version", "k", "ModelInfer", infer(version="9"), NF, "has no version 9"),
    ("kserve bad version", "k", "ModelInfer", infer(version="v1"), INV, "invalid version 'v1'"),
    ("kserve bad name", "k", "ModelInfer", infer(model="../x"), INV, "invalid model name"),
    ("kserve no inputs", "k", "ModelInfer", infer(name=""), INV, "got inputs []"),
    (
        "kserve input name",
        "k",
        "ModelInfer",
        infer(name="pixels"),
        INV,
        "one input named 'image' (FP32 [N, 3, H, W], preprocessed) or encoded images as "
        "'IMAGE' (BYTES [N]), got inputs ['pixels']",
    ),
    (
        "kserve datatype",
        "k",
        "ModelInfer",
        infer(datatype="UINT8"),
        INV,
        "datatype 'UINT8': expected 'FP32'",
    ),
    ("kserve rank", "k", "ModelInfer", infer(shape=(3, 32, 32)), INV, "expected [N, 3, H, W]"),
    (
        "kserve channels",
        "k",
        "ModelInfer",
        infer(shape=(1, 1, 32, 32)),
        INV,
        "expected [N, 3, H, W]",
    ),
    ("kserve batch 0", "k", "ModelInfer", infer(shape=(0, 3, 32, 32)), INV, "batch size 0"),
    (
        "kserve negative batch",
        "k",
        "ModelInfer",
        infer(shape=(-1, 3, 32, 32), raw=[b""]),
        INV,
        "batch size -1",
    ),
    (
        "kserve batch too big",
        "k",
        "ModelInfer",
        infer(shape=(5, 3, 32, 32)),
        INV,
        "expected 1..4 (max_batch_size",
    ),
    ("kserve height", "k", "ModelInfer", infer(shape=(1, 3, 64, 32)), INV, "takes H=32"),
    (
        "kserve segmenter width",
        "k",
        "ModelInfer",
        infer(model=SEG, shape=(1, 3, 32, 32)),
        INV,
        "takes W=48",
    ),
    (
        "kserve raw size",
        "k",
        "ModelInfer",
        infer(raw=[b"\0" * 100]),
        INV,
        "expected one entry of 3072 * 4 = 12288 bytes",
    ),
    ("kserve two raw", "k", "ModelInfer", infer(raw=[b"\0" * 12288] * 2), INV, "[12288, 12288]"),
    ("kserve no data", "k", "ModelInfer", infer(raw=[]), INV, "needs 3072 values, got 0"),
    (
        "kserve raw and typed",
        "k",
        "ModelInfer",
        infer(raw=[b"\0" * 12288], typed=[0.0] * 3072),
        INV,
        "both raw_input_contents and inputs[0].contents",
    ),
    (
        "kserve typed count",
        "k",
        "ModelInfer",
        infer(typed=[0.0] * 10),
        INV,
        "needs 3072 values, got 10",
    ),
    (
        "kserve output",
        "k",
        "ModelInfer",
        infer(outputs=("scores",)),
        INV,
        "requested outputs ['scores'] are not outputs of 'tiny-classifier'",
    ),
    (
        "kserve metadata",
        "k",
        "ModelMetadata",
        kpb.ModelMetadataRequest(name="nope"),
        NF,
        "unknown model 'nope'",
    ),
    (
        "kserve load without explicit",
        "k",
        "RepositoryModelLoad",
        kpb.RepositoryModelLoadRequest(model_name=CLS),
        grpc.StatusCode.FAILED_PRECONDITION,
        "--model-control explicit",
    ),
    # -- visionserve.v1 ------------------------------------------------------------------------
    (
        "raw channels",
        "v",
        "Classify",
        pb.ClassifyRequest(
            model=CLS,
            image=pb.Image(raw=pb.RawImage(data=b"\0" * 8, height=2, width=2, channels=2)),
        ),
        INV,
        "channels=2: expected 1 (gray), 3 (RGB) or 4 (RGBA)",
    ),
    (
        "raw zero height",
        "v",
        "Classify",
        pb.ClassifyRequest(
            model=CLS, image=pb.Image(raw=pb.RawImage(data=b"", height=0, width=2, channels=3))
        ),
        INV,
        "height and width must be at least 1",
    ),
    (
        "raw truth bytes",
        "v",
        "Segment",
        pb.SegmentRequest(
            model=SEG, image=IMAGE, ground_truth=pb.Mask(data=b"\0" * 7, format=pb.MASK_FORMAT_RAW)
        ),
        INV,
        "raw ground truth mask is 7 bytes but height*width = 10*12 = 120",
    ),
    (
        "truth 16-bit",
        "v",
        "Segment",
        pb.SegmentRequest(
            model=SEG,
            image=IMAGE,
            ground_truth=pb.Mask(data=png(np.full((10, 12), 300, np.uint16))),
        ),
        INV,
        "16-bit with values up to 300",
    ),
    (
        "truth colour",
        "v",
        "Segment",
        pb.SegmentRequest(
            model=SEG, image=IMAGE, ground_truth=pb.Mask(data=png(np.zeros((10, 12, 3), np.uint8)))
        ),
        INV,
        "3 channels: expected a single-channel",
    ),
    (
        "bmp bomb header",
        "v",
        "Classify",
        pb.ClassifyRequest(model=CLS, image=pb.Image(encoded=bmp_header(100_000, 100_000))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "100000x100000 = 10000000000 pixels",
    ),
    (
        "get model version",
        "v",
        "GetModel",
        pb.GetModelRequest(model=CLS, version="-1"),
        INV,
        "invalid version '-1'",
    ),
    (
        "truth format",
        "v",
        "Segment",
        pb.SegmentRequest(model=SEG, image=IMAGE, ground_truth=pb.Mask(data=b"x", format=5)),
        INV,
        "ground_truth.format 5 is unknown",
    ),
]


@pytest.fixture(scope="module")
def stubs(grpc_channel):
    return {
        "k": kpb_grpc.GRPCInferenceServiceStub(grpc_channel),
        "v": pb_grpc.VisionServiceStub(grpc_channel),
    }


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 20 and len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(
    ("service", "rpc", "request_", "code", "message"),
    [c[1:] for c in CORPUS],
    ids=[c[0] for c in CORPUS],
)
def test_malformed_request_gets_its_status_and_a_clear_message(
    stubs, service, rpc, request_, code, message
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stubs[service], rpc)(request_, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()
    # the server is still up and right
    reply = stubs["k"].ModelInfer(infer(), timeout=10)
    assert reply.model_name == CLS and len(reply.raw_output_contents) == 2
    assert stubs["v"].Classify(pb.ClassifyRequest(model=CLS, image=IMAGE), timeout=10).top
