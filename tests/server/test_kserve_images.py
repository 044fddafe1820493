"""KServe v2 with encoded images (BYTES ``IMAGE`` / ``GROUND_TRUTH``), Triton's ModelConfig,
ModelStatistics and classification extension, over the session server's raw stubs.

Masks and IoU counts are compared with what ``visionserve.v1`` answers for the same
files: both go through the same ``ServedModel``.
"""

from __future__ import annotations

import json
import struct

import grpc
import make_models
import numpy as np
import pytest
from server_test_helpers import png, v1_segment
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc

SEG, CLS = make_models.SEGMENTER, make_models.CLASSIFIER
INV = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def kserve(grpc_channel) -> kpb_grpc.GRPCInferenceServiceStub:
    return kpb_grpc.GRPCInferenceServiceStub(grpc_channel)


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def image_request(
    model: str,
    images: list[bytes],
    truths: list[bytes] | None = None,
    outputs: dict[str, int] | None = None,
    typed: bool = False,
    **parameters: int,
) -> kpb.ModelInferRequest:
    """A ModelInfer request with BYTES inputs (raw length-prefixed, or ``bytes_contents``)."""
    request = kpb.ModelInferRequest(model_name=model)
    for name, items in (("IMAGE", images), ("GROUND_TRUTH", truths)):
        if items is None:
            continue
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(items)])
        if typed:
            tensor.contents.bytes_contents.extend(items)
        else:
            request.raw_input_contents.append(length_prefixed(items))
    for name, count in (outputs or {}).items():
        output = request.outputs.add(name=name)
        if count:
            output.parameters["classification"].int64_param = count
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    return request


def raw_request(model: str, raw: bytes) -> kpb.ModelInferRequest:
    """An ``IMAGE`` [1] input whose raw contents are ``raw`` as they are."""
    request = kpb.ModelInferRequest(model_name=model)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(raw)
    return request


def unprefix(raw: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        (size,) = struct.unpack_from("<I", raw, pos)
        items.append(raw[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return items


def outputs_of(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": "<f4", "UINT8": "u1", "INT64": "<i8"}
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            out[tensor.name] = np.array(unprefix(raw), dtype=object).reshape(tensor.shape)
        else:
            out[tensor.name] = np.frombuffer(raw, dtypes[tensor.datatype]).reshape(tensor.shape)
    return out


def block_files(
    seed: int, count: int, grid=(24, 32), block=(3, 3), ignored: int = 255
) -> tuple[list, list]:
    """``count`` encoded images (PNG) of ``grid`` blocks and their noisy ground truths
    (the top-left 2x2 pixels ``ignored``)."""
    rng = np.random.default_rng(seed)
    images, truths = [], []
    for _ in range(count):
        image, classes = make_models.block_image(rng, grid=grid, block=block)
        truth = np.repeat(np.repeat(classes, block[0], axis=0), block[1], axis=1)
        truth[rng.random(truth.shape) < 0.1] = rng.integers(0, 4)  # disagree here and there
        truth[:2, :2] = ignored
        images.append(png(image))
        truths.append(png(truth))
    return images, truths


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "bytes_contents"])
def test_segmenter_masks_and_iou_equal_the_v1_answers(kserve, vision_stub, typed: bool) -> None:
    images, truths = block_files(3, 3, grid=(24, 32), block=(3, 3))  # 72x96: resized to 32x48
    response = kserve.ModelInfer(image_request(SEG, images, truths, typed=typed), timeout=20)
    out = outputs_of(response)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("MASK", "UINT8", [3, 72, 96]),
        ("INTERSECTION", "INT64", [3, 4]),
        ("UNION", "INT64", [3, 4]),
    ]
    for i, (image, truth) in enumerate(zip(images, truths, strict=True)):
        v1_mask, v1_iou = v1_segment(vision_stub, SEG, image, truth)
        np.testing.assert_array_equal(out["MASK"][i], v1_mask)
        assert list(out["INTERSECTION"][i]) == [c.intersection for c in v1_iou.classes]
        assert list(out["UNION"][i]) == [c.union for c in v1_iou.classes]
    assert out["UNION"].sum() > out["INTERSECTION"].sum() > 0


def test_images_of_different_sizes_refuse_mask_but_give_iou(kserve, vision_stub) -> None:
    small, small_truth = block_files(4, 1, grid=(16, 16), block=(2, 3))
    large, large_truth = block_files(5, 1, grid=(20, 24), block=(4, 4))
    images, truths = small + large, small_truth + large_truth
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(image_request(SEG, images, truths), timeout=20)
    assert err.value.code() == INV
    assert "32x48, 80x96" in err.value.details() and "one request per image" in err.value.details()
    wanted = {"INTERSECTION": 0, "UNION": 0}
    out = outputs_of(kserve.ModelInfer(image_request(SEG, images, truths, wanted), timeout=20))
    assert set(out) == {"INTERSECTION", "UNION"}
    for i, (image, truth) in enumerate(zip(images, truths, strict=True)):
        _, v1_iou = v1_segment(vision_stub, SEG, image, truth)
        assert list(out["UNION"][i]) == [c.union for c in v1_iou.classes]


def test_ignore_index_parameter_changes_what_is_scored(kserve) -> None:
    images, truths = block_files(6, 1, ignored=0)
    default = outputs_of(kserve.ModelInfer(image_request(SEG, images, truths), timeout=20))
    counted = outputs_of(
        kserve.ModelInfer(image_request(SEG, images, truths, ignore_index=0), timeout=20)
    )
    # every truth pixel of class 0 is ignored: nothing of class 0 can intersect
    assert counted["INTERSECTION"][0, 0] == 0 < default["INTERSECTION"][0, 0]
    assert counted["UNION"][0].sum() < default["UNION"][0].sum()


def test_classifier_images_give_labels_scores_and_probabilities(kserve) -> None:
    colours = [(220, 30, 30), (20, 200, 90), (10, 20, 30)]
    images = [np.broadcast_to(np.array(c, np.uint8), (40, 50, 3)).copy() for c in colours]
    response = kserve.ModelInfer(image_request(CLS, [png(i) for i in images], top_k=2))
    out = outputs_of(response)
    assert set(out) == {"LABELS", "SCORES"} and out["SCORES"].shape == (3, 2)
    assert [row[0] for row in out["LABELS"]] == [b"red", b"green", b"dark"]
    for row, image in zip(out["SCORES"], images, strict=True):
        np.testing.assert_allclose(row, np.sort(make_models.classifier_reference(image))[::-1][:2],
                                   atol=1e-5)
    asked = {"probabilities": 0, "LABELS": 0}
    out = outputs_of(kserve.ModelInfer(image_request(CLS, [png(images[0])], outputs=asked)))
    assert out["probabilities"].shape == (1, 4) and list(out) == ["probabilities", "LABELS"]


def test_classification_extension_gives_score_index_label_strings(kserve) -> None:
    image = np.broadcast_to(np.array((20, 200, 90), np.uint8), (32, 32, 3)).copy()
    request = image_request(CLS, [png(image)], outputs={"probabilities": 3})
    out = outputs_of(kserve.ModelInfer(request, timeout=20))
    reference = make_models.classifier_reference(image)
    expected = [
        f"{reference[i]:f}:{i}:{make_models.LABELS[i]}".encode()
        for i in np.argsort(-reference, kind="stable")[:3]
    ]
    assert out["probabilities"].shape == (1, 3)
    assert [s.split(b":")[1:] for s in out["probabilities"][0]] == [
        e.split(b":")[1:] for e in expected
    ]
    np.testing.assert_allclose(
        [float(s.split(b":")[0]) for s in out["probabilities"][0]],
        [float(e.split(b":")[0]) for e in expected],
        atol=2e-6,
    )


def test_model_config_describes_tensors_batching_and_labels(kserve) -> None:
    config = kserve.ModelConfig(kpb.ModelConfigRequest(name=CLS), timeout=10).config
    assert (config.name, config.platform, config.backend) == (
        CLS,
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == 4 and config.dynamic_batching.max_queue_delay_microseconds
    assert [(t.name, list(t.dims)) for t in config.input] == [("image", [3, 32, 32]), ("IMAGE", [1])]
    assert config.input[0].format == kpb.ModelInput.FORMAT_NCHW
    assert config.input[1].data_type == kpb.TYPE_STRING and config.input[1].HasField("reshape")
    assert [t.name for t in config.output] == ["logits", "probabilities", "LABELS", "SCORES"]
    assert json.loads(config.parameters["labels"].string_value) == list(make_models.LABELS)
    assert config.parameters["input_mode"].string_value == "resize"
    assert config.instance_group[0].kind == kpb.ModelInstanceGroup.KIND_CPU
    seg = kserve.ModelConfig(kpb.ModelConfigRequest(name=SEG), timeout=10).config
    assert [t.name for t in seg.input] == ["image", "IMAGE", "GROUND_TRUTH"]
    assert [t.name for t in seg.output] == ["mask", "MASK", "INTERSECTION", "UNION"]
    assert list(seg.output[2].dims) == [4]


def test_statistics_count_requests_inferences_and_batches(kserve) -> None:
    def stats() -> kpb.ModelStatistics:
        reply = kserve.ModelStatistics(kpb.ModelStatisticsRequest(name=CLS, version="2"))
        (only,) = reply.model_stats
        return only

    before = stats()
    image = png(np.full((32, 32, 3), 90, np.uint8))
    for _ in range(3):
        kserve.ModelInfer(image_request(CLS, [image, image]), timeout=20)
    after = stats()
    assert (after.name, after.version) == (CLS, "2")
    assert after.inference_count == before.inference_count + 6
    assert before.execution_count < after.execution_count <= before.execution_count + 6
    success = after.inference_stats.success
    assert success.count == before.inference_stats.success.count + 3
    assert success.ns > before.inference_stats.success.ns
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    assert after.last_inference >= before.last_inference > 0
    with pytest.raises(grpc.RpcError):
        kserve.ModelInfer(image_request(CLS, [b"not an image"]), timeout=20)
    assert stats().inference_stats.fail.count == after.inference_stats.fail.count + 1
    every = kserve.ModelStatistics(kpb.ModelStatisticsRequest()).model_stats
    assert {(s.name, s.version) for s in every} == {(CLS, "1"), (CLS, "2"), (SEG, "1")}


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (raw_request(SEG, b"\x05\0\0\0ab"), "claims 5 bytes at byte 0, but only 2 follow"),
        (raw_request(SEG, b"\x05\0"), "ends inside a length prefix at byte 0"),
        (image_request(SEG, [b"junk"]), "image 0 of 1: image could not be decoded"),
        (image_request(CLS, [b"x"], truths=[b"y"]), "'GROUND_TRUTH' is for segmenters"),
        (image_request(SEG, [b"x"], outputs={"MASK": 3}), "cannot be classified"),
        (image_request(SEG, [b"x"], outputs={"UNION": 0}), "need a 'GROUND_TRUTH' input"),
        (image_request(SEG, [b"x"], outputs={"mask": 0}), "expected some of ['MASK'"),
        (image_request(CLS, [b"x"] * 5), "has 5 elements: expected 1..4"),
        (image_request(CLS, [b"x"], top_k=-1), "'top_k' is -1: expected at least 1"),
        (image_request(SEG, [b"x"], ignore_index=300), "ignore_index is 300: expected 0..255"),
    ],
    ids=["truncated", "short-prefix", "undecodable", "truth-classifier", "classify-mask", "iou-no-truth",
         "fp32-output", "batch", "top-k", "ignore-index"],
)
def test_bad_image_requests_are_refused_clearly(kserve, request_, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(request_, timeout=20)
    assert err.value.code() == INV, err.value.details()
    assert message in err.value.details()


def test_truth_of_another_size_is_refused(kserve) -> None:
    images, _ = block_files(7, 1)
    truth = png(np.zeros((5, 5), np.uint8))
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(image_request(SEG, images, [truth]), timeout=20)
    assert err.value.code() == INV
    assert "image 0 of 1: ground truth is 5x5 (HxW) but the image is 72x96" in err.value.details()


@pytest.mark.parametrize(
    ("rpc", "request_", "message"),
    [
        ("ModelConfig", kpb.ModelConfigRequest(name="nope"), "unknown model 'nope'"),
        ("ModelConfig", kpb.ModelConfigRequest(name=CLS, version="9"), "has no version 9"),
        ("ModelStatistics", kpb.ModelStatisticsRequest(name="nope"), "unknown model 'nope'"),
    ],
)
def test_config_and_statistics_of_unknown_models_are_not_found(kserve, rpc, request_, message):
    with pytest.raises(grpc.RpcError) as err:
        getattr(kserve, rpc)(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and message in err.value.details()
