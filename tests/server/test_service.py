"""The real server on a free port, called over a real channel with the generated stubs."""

from __future__ import annotations

import math
import threading

import cv2
import grpc
import make_models
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.app import model_health_name
from visionserve.server.service import SERVICE_NAME

SEG, CLS = make_models.SEGMENTER, make_models.CLASSIFIER
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def png(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", rgb[:, :, ::-1] if rgb.ndim == 3 else rgb)
    assert ok
    return buffer.tobytes()


def decode_mask(mask: pb.Mask) -> np.ndarray:
    if mask.format == pb.MASK_FORMAT_RAW:
        return np.frombuffer(mask.data, np.uint8).reshape(mask.height, mask.width)
    return cv2.imdecode(np.frombuffer(mask.data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A 64x144 image (2x3 times the segmenter's 32x48 input) and its exact expected mask."""
    image, classes = make_models.block_image(np.random.default_rng(7), block=(2, 3))
    expected = np.kron(classes, np.ones((2, 3), np.uint8))
    np.testing.assert_array_equal(make_models.segmenter_reference(image), expected)
    return image, expected


def uniform(rgb: tuple[int, int, int], hw: tuple[int, int] = (40, 50)) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (*hw, 3)).copy()


def assert_still_serving(stub) -> None:
    reply = stub.Classify(
        pb.ClassifyRequest(model=CLS, image=pb.Image(encoded=png(uniform((0, 0, 250)))))
    )
    assert reply.top[0].label == "blue"


# -- health, reflection, models --------------------------------------------------
@pytest.mark.parametrize(
    "service", ["", SERVICE_NAME, model_health_name(SEG), model_health_name(CLS)]
)
def test_health_is_serving(health_stub, service: str) -> None:
    assert health_stub.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING


def test_reflection_lists_the_services(grpc_channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(grpc_channel)
    reply = next(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_list_models(vision_stub) -> None:
    models = {m.name: m for m in vision_stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {CLS, SEG}
    assert models[CLS].version == "2" and list(models[CLS].versions) == ["1", "2"]
    seg = models[SEG]
    assert (seg.task, seg.input_height, seg.input_width) == ("segmentation", 32, 48)
    assert (seg.input_mode, list(seg.buckets)) == ("resize", [])
    assert list(seg.labels) == list(make_models.LABELS)
    assert seg.backend == "onnxruntime-cpu" and seg.ignore_index == 255 and seg.max_batch_size == 4
    assert (seg.device, seg.precision) == ("cpu", "fp32")


def test_get_model_by_version(vision_stub) -> None:
    info = vision_stub.GetModel(pb.GetModelRequest(model=CLS, version="1"))
    assert (info.name, info.version, info.task) == (CLS, "1", "classification")


# -- Classify --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("colour", "label"), [((220, 30, 30), "red"), ((20, 200, 90), "green"), ((10, 20, 30), "dark")]
)
def test_classify_top_k(vision_stub, colour: tuple[int, int, int], label: str) -> None:
    image = uniform(colour, hw=(45, 61))
    reply = vision_stub.Classify(
        pb.ClassifyRequest(model=CLS, image=pb.Image(encoded=png(image)), top_k=2, request_id="r-1")
    )
    assert (reply.model, reply.version, reply.request_id) == (CLS, "2", "r-1")
    assert [s.label for s in reply.top][0] == label and len(reply.top) == 2
    want = make_models.classifier_reference(image)
    for score in reply.top:
        assert score.label == make_models.LABELS[score.index]
        assert score.score == pytest.approx(want[score.index], abs=1e-5)
    assert reply.top[0].score >= reply.top[1].score


def test_classify_default_top_k_is_capped_and_raw_images_work(vision_stub) -> None:
    image = uniform((250, 10, 10), hw=(7, 9))
    raw = pb.RawImage(data=image.tobytes(), height=7, width=9, channels=3)
    reply = vision_stub.Classify(
        pb.ClassifyRequest(model=CLS, version="1", image=pb.Image(raw=raw))
    )
    assert reply.version == "1" and len(reply.top) == 4 and reply.top[0].label == "red"
    assert sum(s.score for s in reply.top) == pytest.approx(1.0, abs=1e-5)


# -- Segment ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [pb.MASK_FORMAT_PNG, pb.MASK_FORMAT_RAW])
def test_segment_mask_at_original_size(vision_stub, scene, fmt: int) -> None:
    image, expected = scene
    reply = vision_stub.Segment(
        pb.SegmentRequest(
            model=SEG, image=pb.Image(encoded=png(image)), mask_format=fmt, request_id="s"
        )
    )
    assert (reply.mask.height, reply.mask.width, reply.mask.format) == (64, 144, fmt)
    np.testing.assert_array_equal(decode_mask(reply.mask), expected)
    assert reply.request_id == "s" and not reply.HasField("iou")


def test_segment_iou_matches_an_independent_computation(vision_stub, scene) -> None:
    image, expected = scene
    rng = np.random.default_rng(3)
    truth = expected.copy()
    truth[rng.random(truth.shape) < 0.1] = 1  # some wrong pixels
    truth[:, :12] = 255  # ignored band
    truth[truth == 3] = 0  # class "dark" only in the prediction now
    reply = vision_stub.Segment(
        pb.SegmentRequest(
            model=SEG, image=pb.Image(encoded=png(image)), ground_truth=pb.Mask(data=png(truth))
        )
    )
    keep = truth != 255
    ious = []
    for cls in reply.iou.classes:
        p, t = (expected == cls.index) & keep, (truth == cls.index) & keep
        inter, union = int((p & t).sum()), int((p | t).sum())
        assert (cls.intersection, cls.union, cls.present) == (inter, union, union > 0)
        assert cls.label == make_models.LABELS[cls.index]
        if union:
            assert cls.iou == pytest.approx(inter / union)
            ious.append(inter / union)
    assert reply.iou.mean_iou == pytest.approx(np.mean(ious))
    assert reply.iou.scored_pixels == keep.sum() and reply.iou.ignore_index == 255
    assert reply.iou.pixel_accuracy == pytest.approx((expected == truth)[keep].mean())


def test_segment_absent_class_is_nan_and_request_ignore_index_wins(vision_stub) -> None:
    image = uniform((200, 0, 0), hw=(10, 12))
    truth = np.zeros((10, 12), np.uint8)
    truth[0] = 2  # rows the request ignores
    reply = vision_stub.Segment(
        pb.SegmentRequest(
            model=SEG,
            image=pb.Image(encoded=png(image)),
            ground_truth=pb.Mask(data=truth.tobytes(), format=pb.MASK_FORMAT_RAW),
            ignore_index=2,
        )
    )
    classes = reply.iou.classes
    assert classes[0].iou == 1.0 and classes[0].present
    assert all(math.isnan(c.iou) and not c.present for c in classes[1:])
    assert (
        reply.iou.mean_iou == 1.0 and reply.iou.ignore_index == 2 and reply.iou.scored_pixels == 108
    )


# -- SegmentStream -----------------------------------------------------------------
def test_segment_stream_keeps_order_and_answers_failures_in_band(vision_stub, scene) -> None:
    image, expected = scene
    good = pb.Image(encoded=png(image))
    requests = [
        pb.SegmentRequest(model=SEG, image=good, request_id="0"),
        pb.SegmentRequest(model=SEG, image=pb.Image(encoded=b"garbage"), request_id="1"),
        pb.SegmentRequest(model="missing", image=good, request_id="2"),
        pb.SegmentRequest(model=SEG, image=good, request_id="3", mask_format=pb.MASK_FORMAT_RAW),
        pb.SegmentRequest(model=CLS, image=good, request_id="4"),
    ]
    replies = list(vision_stub.SegmentStream(iter(requests)))
    assert [r.request_id for r in replies] == ["0", "1", "2", "3", "4"]
    codes = [r.error_code for r in replies]
    assert codes == [
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    assert (
        "could not be decoded" in replies[1].error_message and "missing" in replies[2].error_message
    )
    for reply in (replies[0], replies[3]):
        np.testing.assert_array_equal(decode_mask(reply.mask), expected)


# -- errors: code, message, and the server still serves -----------------------------
def _bad_requests() -> list[tuple[str, str, object, grpc.StatusCode, str]]:
    image = uniform((200, 0, 0), hw=(10, 12))
    img = pb.Image(encoded=png(image))
    small_truth = pb.Mask(data=png(np.zeros((5, 12), np.uint8)))
    high_truth = pb.Mask(data=png(np.full((10, 12), 9, np.uint8)))
    bomb = pb.Image(encoded=png(np.zeros((2000, 2500), np.uint8)))  # 5 MP > the 4 MP test limit
    seg, cls = pb.SegmentRequest, pb.ClassifyRequest
    inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return [
        (
            "undecodable",
            "Segment",
            seg(model=SEG, image=pb.Image(encoded=b"\x89PNG broken")),
            inv,
            "could not be decoded",
        ),
        ("no image", "Segment", seg(model=SEG), inv, "image is empty"),
        (
            "bad raw",
            "Classify",
            cls(
                model=CLS,
                image=pb.Image(raw=pb.RawImage(data=b"xx", height=2, width=2, channels=3)),
            ),
            inv,
            "12",
        ),
        (
            "gt size",
            "Segment",
            seg(model=SEG, image=img, ground_truth=small_truth),
            inv,
            "5x12 (HxW) but the image is 10x12",
        ),
        (
            "gt labels",
            "Segment",
            seg(model=SEG, image=img, ground_truth=high_truth),
            inv,
            "values 9 outside the valid range 0..3",
        ),
        (
            "unknown model",
            "Segment",
            seg(model="nope", image=img),
            nf,
            "available models are tiny-classifier, tiny-segmenter",
        ),
        (
            "unknown version",
            "Classify",
            cls(model=CLS, version="9", image=img),
            nf,
            "available versions are 1, 2",
        ),
        ("bad name", "Classify", cls(model="../etc", image=img), inv, "invalid model name"),
        ("wrong task", "Classify", cls(model=SEG, image=img), inv, "needs a classification model"),
        ("wrong task 2", "Segment", seg(model=CLS, image=img), inv, "needs a segmentation model"),
        (
            "pixel limit",
            "Segment",
            seg(model=SEG, image=bomb),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "2000x2500",
        ),
        (
            "ignore_index",
            "Segment",
            seg(
                model=SEG,
                image=img,
                ground_truth=pb.Mask(data=png(np.zeros((10, 12), np.uint8))),
                ignore_index=256,
            ),
            inv,
            "ignore_index is 256",
        ),
        (
            "mask format",
            "Segment",
            seg(model=SEG, image=img, mask_format=7),
            inv,
            "mask_format 7 is unknown",
        ),
        ("unknown get", "GetModel", pb.GetModelRequest(model="nope"), nf, "unknown model 'nope'"),
    ]


@pytest.mark.parametrize(
    ("rpc", "request_", "code", "message"),
    [c[1:] for c in _bad_requests()],
    ids=[c[0] for c in _bad_requests()],
)
def test_bad_input_gets_its_status_and_the_server_keeps_serving(
    vision_stub, rpc, request_, code, message
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(vision_stub, rpc)(request_, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()
    assert_still_serving(vision_stub)


# -- lifecycle ------------------------------------------------------------------
def test_stop_flips_health_to_not_serving(start_server) -> None:
    server = start_server(grace_period_s=0.5)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert next(watch).status == SERVING
        stopper = threading.Thread(target=lambda: server.stop(2.0).wait())
        stopper.start()
        assert next(watch).status == NOT_SERVING
        stopper.join()


def test_backend_failure_is_internal_and_the_server_keeps_serving(start_server, tmp_path) -> None:
    make_models.write_entry(
        tmp_path, "faulty", "segmentation", model=make_models.segmenter_onnx(faulty=True)
    )
    make_models.write_entry(tmp_path, CLS, "classification")
    server = start_server(repository=tmp_path)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        white = pb.Image(encoded=png(uniform((255, 255, 255))))
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(pb.SegmentRequest(model="faulty", image=white), timeout=10)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "class values 4..4, expected 0..3" in err.value.details()
        gray = pb.Image(encoded=png(uniform((128, 0, 0))))
        assert (
            decode_mask(stub.Segment(pb.SegmentRequest(model="faulty", image=gray)).mask).max() == 0
        )
        assert_still_serving(stub)


def test_a_model_that_cannot_load_is_reported_with_its_name(start_server, tmp_path) -> None:
    """The server starts without it (tests/server/test_model_failures.py: the others serve)."""
    make_models.write_entry(tmp_path, "broken", "segmentation")
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    server = start_server(repository=tmp_path)
    assert server.registry.names() == []
    reason = server.registry.failure("broken").reason
    assert "broken v1: no backend could load it: onnxruntime-cpu" in reason


def test_models_answer_unavailable_until_loaded() -> None:
    from visionserve.server.errors import Unavailable
    from visionserve.server.registry import ModelRegistry

    with pytest.raises(Unavailable, match="still loading"):
        ModelRegistry().get(SEG)
