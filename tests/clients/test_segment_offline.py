"""`visionserve segment --repository` (in-process) and `--ray` (Ray Data actors on a
local 2-CPU Ray): the same masks, byte for byte, and the same reports as through a real
server, on the same images; resumable like the gRPC path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import make_models
import pytest
from client_helpers import make_dataset

from visionserve.cli import main

DATASET_SIZE = 24
REPORTS = ("report.json", "report_classes.csv", "report_confusion.csv", "report_images.csv")
JOURNAL = ".visionserve-journal.jsonl"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("offline-data"), DATASET_SIZE)


def args(images: Path, gts: Path, out: Path, *where: str) -> list[str]:
    model = ["--model", make_models.SEGMENTER, "--gt", str(gts), "--out", str(out)]
    return ["segment", str(images), *where, *model, "--overlays", "--no-progress"]


@pytest.fixture(scope="module")
def served(server_address: str, dataset: tuple[Path, Path], tmp_path_factory) -> Path:
    """The reference: the same images segmented through the session's real server."""
    out = tmp_path_factory.mktemp("served")
    assert main(args(*dataset, out, "--server", server_address)) == 0
    return out


def files(out: Path, folder: str) -> dict[str, bytes]:
    return {
        p.relative_to(out / folder).as_posix(): p.read_bytes()
        for p in (out / folder).rglob("*.png")
    }


def assert_same_results(out: Path, reference: Path) -> None:
    masks = files(out, "masks")
    assert len(masks) == DATASET_SIZE
    assert masks == files(reference, "masks"), "masks differ from the server's, byte for byte"
    assert files(out, "overlays") == files(reference, "overlays")
    for name in REPORTS:
        assert (out / name).read_text() == (reference / name).read_text(), name
    report = json.loads((out / "report.json").read_text())
    assert report["segmented"] == DATASET_SIZE and not report["failures"]


def journal_lines(out: Path) -> list[str]:
    return (out / JOURNAL).read_text().splitlines()


def test_in_process_equals_the_server_and_resumes(
    model_repository: Path, dataset: tuple[Path, Path], served: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    where = ("--repository", str(model_repository), "--intra-op-threads", "1")
    assert main(args(*dataset, out, *where, "--batch-size", "4")) == 0
    assert_same_results(out, served)
    # the journal has the same header as the server's run: either can resume the other
    assert journal_lines(out)[0] == journal_lines(served)[0]
    lines = journal_lines(out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*.png")}
    (out / "masks/a/img001.png").unlink()  # one lost mask: only that image is redone
    assert main(args(*dataset, out, *where)) == 0
    redone = journal_lines(out)[len(lines) :]
    assert [json.loads(line)["key"] for line in redone] == ["a/img001.png"]
    unchanged = {
        p: p.stat().st_mtime_ns for p in stamps if p.name != "img001.png" or "/a/" not in str(p)
    }
    assert all(stamps[p] == t for p, t in unchanged.items())
    assert_same_results(out, served)


def test_in_process_failures_are_listed(model_repository: Path, tmp_path: Path, capsys) -> None:
    images, gts = make_dataset(tmp_path / "data", 3)
    (images / "a" / "img001.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(args(images, gts, out, "--repository", str(model_repository))) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["segmented"] == 2
    (failure,) = report["failures"]
    assert failure["image"] == "a/img001.png" and "decode" in failure["reason"].lower()
    assert "FAILED a/img001.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ray", "local", "--server", "localhost:1"], "--ray needs --repository"),
        (["--repository", "{repo}", "--server-iou"], "--server-iou needs --server"),
    ],
)
def test_usage_errors(model_repository: Path, tmp_path: Path, capsys, extra, message) -> None:
    images, gts = make_dataset(tmp_path / "data", 1)
    extra = [e.replace("{repo}", str(model_repository)) for e in extra]
    assert main(args(images, gts, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err


def test_a_classifier_is_refused(model_repository: Path, tmp_path: Path, capsys) -> None:
    images, _ = make_dataset(tmp_path / "data", 1)
    argv = ["segment", str(images), "--repository", str(model_repository)]
    assert main([*argv, "--model", make_models.CLASSIFIER, "--out", str(tmp_path / "o")]) == 2
    assert "segment needs a segmentation model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for this module (the CLI joins it instead of starting one)."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'visionserve[ray]'")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'ray[data]'")
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:  # one more start, then the error
            # Seen twice in CI on a busy 2-core machine: the raylet never registered
            # within Ray's fixed 30 s ("The current node timed out during startup").
            ray.shutdown()
            if attempt == 2:
                raise
            warnings.warn(f"a local Ray failed to start ({exc}); starting it once more")
    yield ray
    ray.shutdown()


def test_ray_data_equals_the_server_and_resumes(
    local_ray, model_repository: Path, dataset: tuple[Path, Path], served: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    where = ("--repository", str(model_repository), "--ray", "local")  # 1 actor: 2 CPUs - 1
    assert main(args(*dataset, out, *where, "--batch-size", "4")) == 0
    assert_same_results(out, served)
    lines = journal_lines(out)
    assert len(lines) == 1 + DATASET_SIZE
    assert main(args(*dataset, out, *where)) == 0  # nothing left: no actor work, same report
    assert journal_lines(out) == lines
    assert_same_results(out, served)


def test_a_backend_that_cannot_load_is_a_clear_usage_error(
    model_repository: Path, tmp_path: Path, capsys
) -> None:
    images, gts = make_dataset(tmp_path / "data", 1)
    where = ("--repository", str(model_repository), "--backends", "tensorrt")
    assert main(args(images, gts, tmp_path / "out", *where)) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "no backend could load it" in err


def test_ray_refuses_a_gpu_backend_on_a_cluster_without_gpus(
    local_ray, model_repository: Path, tmp_path: Path, capsys
) -> None:
    images, gts = make_dataset(tmp_path / "data", 1)
    where = ("--repository", str(model_repository), "--ray", "local", "--backends", "tensorrt")
    assert main(args(images, gts, tmp_path / "out", *where)) == 2
    assert "needs a GPU per actor, but the Ray cluster has none" in capsys.readouterr().err
