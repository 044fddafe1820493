"""`visionserve segment` end to end against real servers: IoU, resumability, failures."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import make_models
import numpy as np
import pytest
from client_helpers import (
    JOURNAL,
    ServerProcess,
    journal_keys,
    make_dataset,
    segment_args,
    write_png,
)

from visionserve.cli import main
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.service import VisionServicer

N = len(make_models.LABELS)
DATASET_SIZE = 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("data"), DATASET_SIZE)


def independent_iou(
    images: Path, gts: Path, masks: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed confusion matrix, intersection and union from the masks on disk (plain numpy)."""
    confusion = np.zeros((N, N), np.int64)
    for gt_path in sorted(gts.rglob("*.png")):
        mask = cv2.imread(str(masks / gt_path.relative_to(gts)), cv2.IMREAD_UNCHANGED)
        truth = cv2.imread(str(gt_path), cv2.IMREAD_UNCHANGED)
        keep = truth != 255
        confusion += np.bincount(truth[keep].astype(int) * N + mask[keep], minlength=N * N).reshape(
            N, N
        )
    inter = np.diag(confusion)
    return confusion, inter, confusion.sum(0) + confusion.sum(1) - inter


def test_dataset_iou_equals_independent_computation(
    server_address: str, dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    images, gts = dataset
    out = tmp_path / "out"
    args = segment_args(images, gts, out, server_address, "--overlays", "--streams", "3")
    assert main([*args, "--server-iou"]) == 0  # the server scores too: counts cross-checked
    report = json.loads((out / "report.json").read_text())
    confusion, inter, union = independent_iou(images, gts, out / "masks")
    assert report["segmented"] == DATASET_SIZE and report["failed"] == 0
    classes = report["iou"]["classes"]
    assert [c["intersection"] for c in classes] == inter.tolist()
    assert [c["union"] for c in classes] == union.tolist()
    assert report["iou"]["mean_iou"] == pytest.approx(np.mean(inter / union), abs=1e-6)
    assert report["iou"]["pixel_accuracy"] == pytest.approx(inter.sum() / confusion.sum(), abs=1e-6)
    assert report["iou"]["confusion_matrix"]["counts"] == confusion.tolist()
    assert report["iou"]["per_image_mean_iou"]["count"] == DATASET_SIZE
    assert f"({DATASET_SIZE} of {DATASET_SIZE} images" in report["iou"]["server_crosscheck"]
    # Masks: the model's exact answer at the original size; overlays mirror the tree.
    sample = images / "b/c/img000.png"
    rgb = cv2.cvtColor(cv2.imread(str(sample)), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(out / "masks/b/c/img000.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(mask, make_models.segmenter_reference(rgb))
    assert cv2.imread(str(out / "overlays/b/c/img000.png")).shape == rgb.shape
    assert len(list((out / "masks").rglob("*.png"))) == DATASET_SIZE
    rows = (out / "report_images.csv").read_text().splitlines()
    assert len(rows) == DATASET_SIZE + 1 and all(",ok," in r for r in rows[1:])
    assert (out / "report_classes.csv").read_text().startswith("index,label,iou,intersection,union")
    assert "<svg" in (out / "report.html").read_text()


def test_no_cross_check_is_claimed_without_server_iou(
    server_address: str, tmp_path: Path
) -> None:
    images, gts = make_dataset(tmp_path, 3, noise=False)
    out = tmp_path / "out"
    assert main(segment_args(images, gts, out, server_address)) == 0
    assert json.loads((out / "report.json").read_text())["iou"]["server_crosscheck"] is None
    # A rerun of one image with --server-iou: the report counts what was checked.
    (out / "masks" / next(images.rglob("*.png")).relative_to(images)).unlink()
    assert main(segment_args(images, gts, out, server_address, "--server-iou")) == 0
    claim = json.loads((out / "report.json").read_text())["iou"]["server_crosscheck"]
    assert "(1 of 3 images, sent with --server-iou)" in claim


def test_glob_and_list_file_inputs(
    server_address: str, dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    images, gts = dataset
    out = tmp_path / "glob"
    assert main(segment_args(Path(f"{images}/**/img00*.png"), gts, out, server_address)) == 0
    written = sorted(
        p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png")
    )
    assert written == sorted(f"{'a' if i % 2 else 'b/c'}/img00{i}.png" for i in range(10))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{images}/a/img001.png\n\n{images}/b/c/img002.png\n")
    out = tmp_path / "list"
    assert main(segment_args(listing, gts, out, server_address)) == 0
    assert json.loads((out / "report.json").read_text())["segmented"] == 2
    assert (out / "masks/a/img001.png").is_file() and (out / "masks/b/c/img002.png").is_file()


def test_corrupt_and_unreadable_files_are_listed(
    server_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, gts = make_dataset(tmp_path, 6, seed=5)
    (images / "truncated.png").write_bytes(
        cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))[1][:60].tobytes()
    )
    (images / "text.jpg").write_text("this is not a JPEG")
    (images / "empty.png").write_bytes(b"")
    (images / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    write_png(images / "wrong_gt_size.png", np.full((20, 20, 3), 200, np.uint8))
    write_png(images / "no_gt.png", np.full((20, 20, 3), 200, np.uint8))
    for name in ("truncated", "text", "empty", "dangling"):
        write_png(gts / f"{name}.png", np.zeros((40, 40), np.uint8))
    write_png(gts / "wrong_gt_size.png", np.zeros((21, 20), np.uint8))
    out = tmp_path / "out"
    code = main(segment_args(images, gts, out, server_address))
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    reasons = {f["image"]: f["reason"] for f in report["failures"]}
    assert set(reasons) == {
        "truncated.png",
        "text.jpg",
        "empty.png",
        "dangling.png",
        "wrong_gt_size.png",
        "no_gt.png",
    }
    assert (
        "INVALID_ARGUMENT" in reasons["truncated.png"] and "INVALID_ARGUMENT" in reasons["text.jpg"]
    )
    assert "cannot read the file" in reasons["dangling.png"]
    assert (
        "ground truth" in reasons["wrong_gt_size.png"] and "no ground truth" in reasons["no_gt.png"]
    )
    assert report["segmented"] == 6 and report["iou"]["images"] == 6
    assert "FAILED dangling.png" in capsys.readouterr().err
    html = (out / "report.html").read_text()
    assert "Failures (6)" in html and "wrong_gt_size.png" in html


def run_cli(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "visionserve.cli", "--log-level", "INFO", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )


def wait_for_lines(
    out: Path, lines: int, process: subprocess.Popen[bytes], timeout: float = 20
) -> int:
    """Poll the journal until it has ``lines`` records; returns the count seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        journal = out / JOURNAL
        seen = journal.read_bytes().count(b"\n") - 1 if journal.exists() else 0
        if seen >= lines:
            return seen
        time.sleep(0.003)
    raise AssertionError(f"the client did not reach {lines} images (exit {process.poll()})")


def assert_complete(out: Path, dataset: tuple[Path, Path], reference: dict) -> None:
    keys = journal_keys(out)
    assert len(keys) == len(set(keys)) == DATASET_SIZE, "every image journaled exactly once"
    files = [p for p in out.rglob("*") if p.is_file() and p.parent != out]
    assert len(files) == DATASET_SIZE and all(p.suffix == ".png" for p in files), "no temp files"
    report = json.loads((out / "report.json").read_text())
    assert report == reference  # nothing in it depends on timing or on the interruption
    _, inter, union = independent_iou(*dataset, out / "masks")
    assert [c["intersection"] for c in report["iou"]["classes"]] == inter.tolist()
    assert [c["union"] for c in report["iou"]["classes"]] == union.tolist()


@pytest.fixture(scope="module")
def reference_report(
    vision_server: object,
    server_address: str,
    dataset: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    out = tmp_path_factory.mktemp("reference")
    assert main(segment_args(*dataset, out, server_address)) == 0
    return json.loads((out / "report.json").read_text())


def test_server_killed_and_restarted_loses_and_duplicates_nothing(
    server_process, dataset: tuple[Path, Path], reference_report: dict, tmp_path: Path
) -> None:
    server: ServerProcess = server_process()
    out = tmp_path / "out"
    client = run_cli(
        segment_args(
            *dataset,
            out,
            server.address,
            "--streams",
            "2",
            "--window",
            "4",
            "--give-up-after",
            "30",
        ),
        tmp_path / "client.log",
    )
    killed_at = wait_for_lines(out, 40, client)
    server.kill()
    time.sleep(0.5)
    server.start()
    assert client.wait(60) == 0, (tmp_path / "client.log").read_text()[-3000:]
    assert killed_at < DATASET_SIZE - 50, (
        "the server must die mid-run for this test to mean anything"
    )
    assert "reopening" in (tmp_path / "client.log").read_text()
    assert_complete(out, dataset, reference_report)
    # A rerun finds everything finished and writes the same report.
    rerun = run_cli(segment_args(*dataset, out, server.address), tmp_path / "rerun.log")
    assert rerun.wait(60) == 0
    assert_complete(out, dataset, reference_report)


def test_server_sigterm_mid_run_drains_at_once_and_a_restart_finishes(
    server_process, dataset: tuple[Path, Path], reference_report: dict, tmp_path: Path
) -> None:
    """SIGTERM mid-run: the streams answered UNAVAILABLE in-band half-close at once, so
    the server's drain ends long before its --grace (it would wait for open streams);
    the refused images are sent after the restart: nothing lost or doubled."""
    server: ServerProcess = server_process(grace=30)
    out = tmp_path / "out"
    args = segment_args(*dataset, out, server.address, "--streams", "2", "--window", "4")
    client = run_cli([*args, "--give-up-after", "60"], tmp_path / "client.log")
    wait_for_lines(out, 40, client)
    code, drained = server.terminate(timeout=45)
    stopped_at = len(journal_keys(out))
    server.start()
    assert client.wait(60) == 0, (tmp_path / "client.log").read_text()[-3000:]
    assert code == 0 and drained < 15, (code, drained)
    assert stopped_at < DATASET_SIZE - 50, "the server must stop mid-run for this to mean anything"
    assert "shutting down" in (tmp_path / "client.log").read_text()
    assert_complete(out, dataset, reference_report)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_then_rerun_completes(
    server_process,
    dataset: tuple[Path, Path],
    reference_report: dict,
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    """Ctrl-C, or SIGTERM (a job being stopped), winds the run down (exit 128 + signal,
    finished images recorded); the rerun does the rest."""
    server: ServerProcess = server_process()
    out = tmp_path / "out"
    client = run_cli(
        segment_args(*dataset, out, server.address, "--streams", "2", "--window", "4"),
        tmp_path / "client.log",
    )
    interrupted_at = wait_for_lines(out, 40, client)
    client.send_signal(signum)
    assert client.wait(30) == 128 + signum, (tmp_path / "client.log").read_text()[-3000:]
    assert "rerun the same command to continue" in (tmp_path / "client.log").read_text()
    assert interrupted_at < DATASET_SIZE - 50
    assert len(journal_keys(out)) < DATASET_SIZE
    rerun = run_cli(segment_args(*dataset, out, server.address), tmp_path / "rerun.log")
    assert rerun.wait(60) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert_complete(out, dataset, reference_report)


def test_a_client_killed_mid_write_leaves_no_temporary_file_after_the_rerun(
    server_address: str, tmp_path: Path
) -> None:
    """kill -9 between writing a mask's temporary file and renaming it leaves
    ``.<name>.<pid>-<thread>.partial``; the rerun removes it (its writer is gone)."""
    images, gts = make_dataset(tmp_path, 4, noise=False)
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from visionserve.cli import main\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "main(sys.argv[1:])\n"
    )
    args = segment_args(images, gts, out, server_address)
    killed = subprocess.run([sys.executable, "-c", code, *args], timeout=120, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = list(out.rglob("*.partial"))
    assert left and not list((out / "masks").rglob("*.png"))
    assert main(args) == 0
    assert not list(out.rglob("*.partial"))
    assert len(list((out / "masks").rglob("*.png"))) == 4


def test_unreachable_server_stops_cleanly(tmp_path: Path, dataset: tuple[Path, Path]) -> None:
    from client_helpers import free_port

    code = main(segment_args(*dataset, tmp_path / "out", f"127.0.0.1:{free_port()}"))
    assert code == 3


def test_journal_of_another_run_is_refused(server_address: str, tmp_path: Path) -> None:
    images, gts = make_dataset(tmp_path, 2, seed=1, noise=False)
    out = tmp_path / "out"
    assert main(segment_args(images, gts, out, server_address)) == 0
    assert main(segment_args(images, gts, out, server_address, "--ignore-index", "3")) == 2
    assert (
        main(segment_args(images, gts, out, server_address, "--ignore-index", "3", "--restart"))
        == 0
    )


def test_server_gone_for_good_stops_cleanly_and_a_rerun_finishes(
    server_process, dataset: tuple[Path, Path], reference_report: dict, tmp_path: Path
) -> None:
    server: ServerProcess = server_process()
    out = tmp_path / "out"
    client = run_cli(
        segment_args(
            *dataset,
            out,
            server.address,
            "--streams",
            "2",
            "--window",
            "4",
            "--give-up-after",
            "1.5",
        ),
        tmp_path / "client.log",
    )
    wait_for_lines(out, 40, client)
    server.kill()
    code = client.wait(30)
    log = (tmp_path / "client.log").read_text()
    assert code == 3, log[-3000:]
    assert "STOPPED: no answer from" in log and "rerun to continue" in log, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] and report["failed"] == 0, log[-3000:]
    assert report["segmented"] + report["not_done"] == DATASET_SIZE
    server.start()
    rerun = run_cli(segment_args(*dataset, out, server.address), tmp_path / "rerun.log")
    assert rerun.wait(60) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert_complete(out, dataset, reference_report)


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {
        p.relative_to(out).as_posix(): cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        for p in sorted((out / "masks").rglob("*.png"))
    }


def test_one_image_per_message_gives_the_same_masks(
    server_address: str, tmp_path: Path
) -> None:
    images, gts = make_dataset(tmp_path, 24)
    for per_message in ("8", "1"):
        out = tmp_path / f"out{per_message}"
        code = main(segment_args(images, gts, out, server_address, "--per-message", per_message))
        assert code == 0
    batched, single = _masks(tmp_path / "out8"), _masks(tmp_path / "out1")
    assert len(batched) == 24 and batched.keys() == single.keys()
    for key, mask in batched.items():
        np.testing.assert_array_equal(mask, single[key])


def test_a_server_without_segment_batches_is_sent_one_image_per_message(
    start_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older server answers SegmentBatches with UNIMPLEMENTED: the run goes on over
    SegmentStream and nothing is lost."""
    monkeypatch.setattr(
        VisionServicer, "SegmentBatches", pb_grpc.VisionServiceServicer.SegmentBatches
    )
    server = start_server()
    images, gts = make_dataset(tmp_path, 30)
    with caplog.at_level(logging.INFO, logger="visionserve.clients._batch"):
        code = main(segment_args(images, gts, tmp_path / "out", f"127.0.0.1:{server.port}"))
    assert code == 0
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["segmented"] == 30 and not report["failures"]
    assert sorted(journal_keys(tmp_path / "out")) == sorted(
        p.relative_to(images).as_posix() for p in images.rglob("*.png")
    )
    assert "has no SegmentBatches" in caplog.text
