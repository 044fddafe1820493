"""KServe v2 / Open Inference Protocol on the session server: raw stubs, then tritonclient.

tritonclient runs in a child process: its generated ``inference`` messages and ours
cannot share one protobuf descriptor pool (duplicate symbols), and a real client
never shares a process with the server anyway.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import grpc
import make_models
import numpy as np
import pytest
from server_test_helpers import png, v1_segment
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc

SEG, CLS = make_models.SEGMENTER, make_models.CLASSIFIER


@pytest.fixture(scope="module")
def kserve(grpc_channel) -> kpb_grpc.GRPCInferenceServiceStub:
    return kpb_grpc.GRPCInferenceServiceStub(grpc_channel)


def normalized(image: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> the tiny models' FP32 1x3xHxW input (mean = std = 0.5)."""
    x = (image.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def infer_request(model: str, tensor: np.ndarray, **kwargs: object) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, **kwargs)
    request.inputs.add(name="image", datatype="FP32", shape=list(tensor.shape))
    request.raw_input_contents.append(tensor.astype("<f4").tobytes())
    return request


def outputs_of(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": "<f4", "UINT8": "u1", "INT64": "<i8"}
    return {
        out.name: np.frombuffer(raw, dtypes[out.datatype]).reshape(out.shape)
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_server_live_ready_and_metadata(kserve) -> None:
    assert kserve.ServerLive(kpb.ServerLiveRequest()).live
    assert kserve.ServerReady(kpb.ServerReadyRequest()).ready
    meta = kserve.ServerMetadata(kpb.ServerMetadataRequest())
    assert meta.name == "visionserve" and "model_repository" in meta.extensions


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [(CLS, "", True), (CLS, "1", True), (CLS, "7", False), ("nope", "", False)],
)
def test_model_ready(kserve, name: str, version: str, ready: bool) -> None:
    assert kserve.ModelReady(kpb.ModelReadyRequest(name=name, version=version)).ready is ready


def test_model_metadata_names_both_input_forms_the_outputs_and_backend(kserve) -> None:
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name=SEG))
    assert (meta.name, list(meta.versions), meta.platform) == (SEG, ["1"], "onnxruntime-cpu")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "FP32", [-1, 3, 32, 48]),
        ("IMAGE", "BYTES", [-1]),
        ("GROUND_TRUTH", "BYTES", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("mask", "UINT8", [-1, -1, -1]),
        ("MASK", "UINT8", [-1, -1, -1]),
        ("INTERSECTION", "INT64", [-1, 4]),
        ("UNION", "INT64", [-1, 4]),
    ]
    cls = kserve.ModelMetadata(kpb.ModelMetadataRequest(name=CLS, version="1"))
    assert [t.name for t in cls.inputs] == ["image", "IMAGE"]
    assert [t.name for t in cls.outputs] == ["logits", "probabilities", "LABELS", "SCORES"]


def test_model_infer_classifier_matches_the_reference(kserve) -> None:
    colours = [(220, 30, 30), (20, 200, 90), (10, 20, 30)]
    images = [np.broadcast_to(np.array(c, np.uint8), (32, 32, 3)) for c in colours]
    tensor = np.concatenate([normalized(i) for i in images])
    response = kserve.ModelInfer(infer_request(CLS, tensor, id="req-7"))
    assert (response.model_name, response.model_version, response.id) == (CLS, "2", "req-7")
    probabilities = outputs_of(response)["probabilities"]
    assert probabilities.shape == (3, 4)
    for row, image in zip(probabilities, images, strict=True):
        np.testing.assert_allclose(row, make_models.classifier_reference(image), atol=1e-5)


def test_model_infer_segmenter_with_typed_contents_and_one_requested_output(kserve) -> None:
    image, _ = make_models.block_image(np.random.default_rng(1), grid=(16, 16), block=(2, 3))
    tensor = normalized(image)
    request = kpb.ModelInferRequest(model_name=SEG)
    request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 48])
    request.inputs[0].contents.fp32_contents.extend(tensor.ravel().tolist())
    request.outputs.add(name="mask")
    mask = outputs_of(kserve.ModelInfer(request))["mask"]
    np.testing.assert_array_equal(mask[0], make_models.segmenter_reference(image))


def test_concurrent_model_infer_requests_each_get_their_own_answer(kserve) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    images = [make_models.block_image(rng, grid=(16, 16), block=(2, 3))[0] for _ in range(24)]

    def call(image: np.ndarray) -> np.ndarray:
        return outputs_of(kserve.ModelInfer(infer_request(SEG, normalized(image)), timeout=20))[
            "mask"
        ][0]

    with ThreadPoolExecutor(8) as pool:
        masks = list(pool.map(call, images))
    for mask, image in zip(masks, images, strict=True):
        np.testing.assert_array_equal(mask, make_models.segmenter_reference(image))


def test_repository_index_lists_loaded_versions(kserve) -> None:
    index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest())
    assert {(m.name, m.version, m.state) for m in index.models} == {
        (CLS, "1", "READY"),
        (CLS, "2", "READY"),
        (SEG, "1", "READY"),
    }


def test_load_and_unload_need_explicit_model_control(kserve) -> None:
    with pytest.raises(grpc.RpcError) as err:
        kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=CLS))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--model-control explicit" in err.value.details()


# -- tritonclient, unchanged, in a child process ---------------------------------------------
TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as triton

    url, seg, cls = sys.argv[1:4]
    client = triton.InferenceServerClient(url)
    out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
           "model_ready": client.is_model_ready(seg)}
    meta = client.get_model_metadata(cls, as_json=True)
    out["cls_inputs"] = meta["inputs"]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(2, 32, 48, 3)).astype(np.uint8)
    x = ((image.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(seg, [inp], outputs=[triton.InferRequestedOutput("mask")],
                          client_timeout=30)
    out["mask"] = result.as_numpy("mask").tolist()
    out["image"] = image.tolist()
    uniform = np.full((1, 3, 32, 32), 0.8, np.float32)
    inp = triton.InferInput("image", [1, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(uniform)
    out["probabilities"] = client.infer(cls, [inp], model_version="1").as_numpy(
        "probabilities").tolist()
    try:
        client.infer("missing", [inp])
    except triton.InferenceServerException as exc:
        out["missing"] = [exc.status(), exc.message()]
    # Triton's extensions: configuration, statistics, classification
    out["config"] = client.get_model_config(cls, as_json=True)["config"]
    before = client.get_inference_statistics(cls, "2", as_json=True)["model_stats"][0]
    inp = triton.InferInput("image", [2, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(np.repeat(uniform, 2, axis=0))
    classes = client.infer(cls, [inp], outputs=[
        triton.InferRequestedOutput("probabilities", class_count=3)])
    out["classes"] = [[s.decode() for s in row] for row in classes.as_numpy("probabilities")]
    after = client.get_inference_statistics(cls, "2", as_json=True)["model_stats"][0]
    out["stats"] = [before, after]
    # encoded images (BYTES IMAGE + GROUND_TRUTH) -> MASK, INTERSECTION, UNION
    files = json.loads(sys.argv[4])
    images = np.array([bytes.fromhex(f) for f in files["images"]], dtype=np.object_)
    truths = np.array([bytes.fromhex(f) for f in files["truths"]], dtype=np.object_)
    inputs = [triton.InferInput("IMAGE", [len(images)], "BYTES"),
              triton.InferInput("GROUND_TRUTH", [len(truths)], "BYTES")]
    inputs[0].set_data_from_numpy(images)
    inputs[1].set_data_from_numpy(truths)
    result = client.infer(seg, inputs, client_timeout=30)
    for name in ("MASK", "INTERSECTION", "UNION"):
        out[name] = result.as_numpy(name).tolist()
    labels = triton.InferInput("IMAGE", [1], "BYTES")
    labels.set_data_from_numpy(images[:1])
    result = client.infer(cls, [labels], parameters={"top_k": 2})
    out["LABELS"] = [[s.decode() for s in row] for row in result.as_numpy("LABELS")]
    out["SCORES"] = result.as_numpy("SCORES").tolist()
    print(json.dumps(out))
    """
)


def _have_tritonclient() -> bool:
    code = "import tritonclient.grpc"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    return result.returncode == 0


@pytest.mark.skipif(
    not _have_tritonclient(),
    reason="tritonclient is not installed: `pip install --no-deps tritonclient python-rapidjson` "
    "(tritonclient[grpc] pins protobuf<7; it runs fine on protobuf 7)",
)
def test_tritonclient_works_unchanged(server_address: str, vision_stub) -> None:
    rng = np.random.default_rng(11)
    encoded, truths = [], []
    for _ in range(2):
        image, classes = make_models.block_image(rng, grid=(20, 24), block=(3, 4))
        truth = np.repeat(np.repeat(classes, 3, axis=0), 4, axis=1)
        truth[rng.random(truth.shape) < 0.1] = 2
        encoded.append(png(image))
        truths.append(png(truth))
    files = json.dumps({"images": [i.hex() for i in encoded], "truths": [t.hex() for t in truths]})
    result = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, server_address, SEG, CLS, files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["cls_inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]},
        {"name": "IMAGE", "datatype": "BYTES", "shape": ["-1"]},
    ]
    images = np.array(out["image"], np.uint8)
    masks = np.array(out["mask"])
    assert masks.shape == (2, 32, 48)
    for mask, image in zip(masks, images, strict=True):
        np.testing.assert_array_equal(mask, make_models.segmenter_reference(image))
    # 0.8 in normalized space: every channel equally bright; "dark" loses
    probabilities = np.array(out["probabilities"])
    assert probabilities.shape == (1, 4) and probabilities[0].sum() == pytest.approx(1, abs=1e-5)
    assert probabilities[0, 3] < probabilities[0, 0]
    assert (
        out["missing"][0] == "StatusCode.NOT_FOUND"
        and "unknown model 'missing'" in out["missing"][1]
    )
    _check_triton_extensions(out)
    # encoded images: masks equal the v1 Segment masks, counts equal the v1 IoU counts
    masks = np.array(out["MASK"], np.uint8)
    assert masks.shape == (2, 60, 96)
    for i, (image, truth) in enumerate(zip(encoded, truths, strict=True)):
        v1_mask, v1_iou = v1_segment(vision_stub, SEG, image, truth)
        np.testing.assert_array_equal(masks[i], v1_mask)
        assert out["INTERSECTION"][i] == [c.intersection for c in v1_iou.classes]
        assert out["UNION"][i] == [c.union for c in v1_iou.classes]
    assert len(out["LABELS"][0]) == 2 and len(out["SCORES"][0]) == 2


def _check_triton_extensions(out: dict) -> None:
    """get_model_config, get_inference_statistics and class_count, as tritonclient decoded them."""
    config = out["config"]
    assert config["name"] == CLS and config["max_batch_size"] == 4
    assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert [i["name"] for i in config["input"]] == ["image", "IMAGE"]
    assert config["input"][0]["dims"] == ["3", "32", "32"]
    assert config["input"][1]["data_type"] == "TYPE_STRING"
    assert json.loads(config["parameters"]["labels"]["string_value"]) == list(make_models.LABELS)
    before, after = out["stats"]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 2
    assert int(after["execution_count"]) == int(before.get("execution_count", 0)) + 1
    success = after["inference_stats"]["success"]
    assert int(success["count"]) == int(before["inference_stats"]["success"].get("count", 0)) + 1
    # 0.8 everywhere: red, green and blue tie (lowest index first), "dark" last
    reference = make_models.classifier_reference(np.full((4, 4, 3), 229.5))
    for row in out["classes"]:
        assert [s.split(":", 1)[1] for s in row] == ["0:red", "1:green", "2:blue"]
        assert float(row[0].split(":")[0]) == pytest.approx(reference[0], abs=1e-5)
