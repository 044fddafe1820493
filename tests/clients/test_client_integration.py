"""The Python client and the segment/classify commands against a real server on a real port."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import grpc
import make_models
import numpy as np
import pytest

from client_helpers import make_dataset

from visionserve.cli import main
from visionserve.clients import VisionClient, VisionServeError


@pytest.fixture
def client(server_address: str):
    with VisionClient(server_address, timeout=10) as c:
        yield c


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    assert cv2.imwrite(str(path), bgr)
    return path


def numpy_iou(pred: np.ndarray, truth: np.ndarray, n: int, ignore: int = 255):
    keep = truth != ignore
    cm = np.bincount(truth[keep].astype(int) * n + pred[keep], minlength=n * n).reshape(n, n)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    return inter, union


def test_classify_paths_bytes_and_arrays(client: VisionClient, tmp_path: Path) -> None:
    blue = np.zeros((40, 30, 3), np.uint8)
    blue[..., 2] = 220
    path = write_png(tmp_path / "blue.png", blue)
    for image in (path, path.read_bytes(), blue):
        result = client.classify(image, model=make_models.CLASSIFIER, top_k=2)
        assert result.label == "blue"
        assert len(result.top) == 2 and result.top[0].score > result.top[1].score


def test_segment_returns_mask_at_original_size_and_iou(client: VisionClient) -> None:
    rng = np.random.default_rng(3)
    image, classes = make_models.block_image(rng, block=(3, 2))  # 96x96, not the model's 32x48
    truth = np.repeat(np.repeat(classes, 3, axis=0), 2, axis=1)
    truth[:5, :5] = 255
    truth[-7:, :] = np.where(truth[-7:, :] == 0, 1, truth[-7:, :])  # some disagreement
    result = client.segment(image, model=make_models.SEGMENTER, ground_truth=truth)
    assert result.mask.shape == image.shape[:2]
    np.testing.assert_array_equal(result.mask, make_models.segmenter_reference(image))
    inter, union = numpy_iou(result.mask, truth, len(make_models.LABELS))
    assert [c.intersection for c in result.iou.classes] == inter.tolist()
    assert [c.union for c in result.iou.classes] == union.tolist()
    expected = [i / u for i, u in zip(inter, union, strict=True) if u]
    assert result.iou.mean_iou == pytest.approx(np.mean(expected))


def test_errors_carry_status_codes(client: VisionClient) -> None:
    with pytest.raises(VisionServeError) as info:
        client.segment(b"not an image", model=make_models.SEGMENTER)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(VisionServeError) as info:
        client.classify(np.zeros((4, 4, 3), np.uint8), model="no-such-model")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert make_models.CLASSIFIER in info.value.details  # says what exists
    client.wait_ready(timeout=5)
    assert {m.name for m in client.list_models()} >= {make_models.CLASSIFIER, make_models.SEGMENTER}


def test_segment_command_unknown_model_exits_2(server_address: str, tmp_path: Path) -> None:
    images, _ = make_dataset(tmp_path, 1)
    code = main(
        [
            "segment",
            str(images),
            "--server",
            server_address,
            "--model",
            "nope",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    code = main(
        [
            "segment",
            str(images),
            "--server",
            server_address,
            "--model",
            make_models.CLASSIFIER,
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2  # a classifier cannot segment


def test_classify_command_writes_csv_and_accuracy(
    server_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    colours = {
        "red": (230, 10, 10),
        "green": (10, 230, 10),
        "blue": (10, 10, 230),
        "dark": (5, 5, 5),
    }
    rows = []
    for i, (name, rgb) in enumerate(colours.items()):
        write_png(tmp_path / "in" / f"{name}{i}.png", np.full((20 + i, 30, 3), rgb, np.uint8))
        rows.append(
            {"image": f"{name}{i}.png", "label": name if name != "dark" else "red"}
        )  # one wrong
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "classes.csv"
    code = main(
        [
            "classify",
            str(tmp_path / "in"),
            "--server",
            server_address,
            "--model",
            make_models.CLASSIFIER,
            "--out",
            str(out),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--top-k",
            "2",
        ]
    )
    assert code == 0
    with open(out, newline="") as fh:
        predicted = {Path(r["image"]).stem: r["label1"] for r in csv.DictReader(fh)}
    assert predicted == {"red0": "red", "green1": "green", "blue2": "blue", "dark3": "dark"}
    assert "top-1 accuracy: 0.7500 (3/4)" in capsys.readouterr().out
    report = json.loads((tmp_path / "classes.report.json").read_text())
    assert report["accuracy"] == 0.75 and report["scored"] == 4
    counts = report["confusion_matrix"]["counts"]  # rows true, columns predicted
    assert counts[0] == [1, 0, 0, 1] and counts[1][1] == counts[2][2] == 1 and sum(counts[3]) == 0
    assert "<svg" in (tmp_path / "classes.report.html").read_text()


def test_dataset_mean_is_nan_skipping(server_address: str, tmp_path: Path) -> None:
    red = np.zeros((32, 48, 3), np.uint8)
    red[..., 0] = 255
    write_png(tmp_path / "in/red.png", red)
    write_png(tmp_path / "gt/red.png", np.zeros((32, 48), np.uint8))
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(tmp_path / "in"),
                "--server",
                server_address,
                "--model",
                make_models.SEGMENTER,
                "--gt",
                str(tmp_path / "gt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    ious = [c["iou"] for c in report["iou"]["classes"]]
    assert ious[0] == 1.0 and ious[1:] == [None, None, None]
    assert report["iou"]["mean_iou"] == 1.0 and not math.isnan(report["iou"]["mean_iou"])
