"""``visionserve demo``: the whole pipeline on generated data, end to end.

generate -> train (classifier, segmenter) -> export -> serve on a free port ->
segment + classify held-out images -> per-class IoU table -> stop the server.
Every step runs the real ``visionserve`` subcommand, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from visionserve.clients import VisionClient
from visionserve.export.recipe import DEFAULT_MIN_CLASS_IOU
from visionserve.server.cores import usable_cores

CLASSIFIER, SEGMENTER = "shapes-resnet", "shapes-unet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"),
                        help="where data, checkpoints, the model repository and results go (default: demo-output)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and one short epoch: checks the plumbing, not the accuracy")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--export-only", action="store_true",
                        help="stop after export: leave a model repository in WORKDIR/models (the compose export job)")
    parser.add_argument("--min-class-iou", type=float, default=DEFAULT_MIN_CLASS_IOU,
                        help="quality floor: fail, naming the class, when the segmenter's IoU for any class "
                             "ends below it, held out after training and through the server "
                             f"(default: {DEFAULT_MIN_CLASS_IOU}; 0 disables; --quick disables it)")


def _step(*args: str) -> None:
    command = [sys.executable, "-m", "visionserve.cli", *args]
    print(f"\n$ visionserve {shlex.join(args)}", flush=True)
    subprocess.run(command, check=True)


def _step_beside(args: tuple[str, ...], foreground: tuple[str, ...]) -> None:
    """Run ``args`` in the background while ``foreground`` runs (each on its share of the
    cores); the background step's output (no progress bar) is shown once both have ended."""
    print(f"\n$ visionserve {shlex.join(args)} &", flush=True)
    command = [sys.executable, "-m", "visionserve.cli", *args]
    background = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        _step(*foreground)
    finally:
        output, _ = background.communicate()
        print(f"\n(output of `visionserve {args[0]} {shlex.join(args[1:3])} ... &`)\n{output}", end="", flush=True)
    if background.returncode:
        raise subprocess.CalledProcessError(background.returncode, command)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_and_export(work: Path, quick: bool, floor: float) -> None:
    counts = ("64", "32") if quick else ("3000", "300")
    _step_beside(("generate", "--out", str(work / "data/val"), "--count", counts[1], "--seed", "1"),
                 ("generate", "--out", str(work / "data/train"), "--count", counts[0], "--seed", "0"))
    extra = ["--epochs", "1"] if quick else []
    data = ("--data", str(work / "data/train"), "--val", str(work / "data/val"))
    checkpoints = {name: work / "checkpoints" / name for name in (CLASSIFIER, SEGMENTER)}
    cores = usable_cores()
    # The two trainings run side by side on half the cores each: a small model's training
    # gains only ~1.3x from a second thread, so two at once end sooner than one after the other.
    _step_beside(("train", "--task", "classification", *data, "--out", str(checkpoints[CLASSIFIER]),
                  "--threads", str(max(1, cores // 2)), *extra),
                 ("train", "--task", "segmentation", *data, "--out", str(checkpoints[SEGMENTER]),
                  "--threads", str(max(1, cores - cores // 2)), *extra, "--min-class-iou", str(floor)))
    for name, ckpt in checkpoints.items():
        _step("export", "--checkpoint", str(ckpt / "model.pth"), "--repository", str(work / "models"),
              "--name", name, "--version", "1", *([] if not quick else ["--samples", str(work / "data/val/images")]))


def _serve_and_call(work: Path, port: int) -> None:
    port = port or _free_port()
    address = f"127.0.0.1:{port}"
    args = ["serve", "--repository", str(work / "models"), "--port", str(port)]
    print(f"\n$ visionserve {shlex.join(args)} &", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "visionserve.cli", *args])
    try:
        with VisionClient(address) as client:
            client.wait_ready(timeout=120)
        val = work / "data/val"
        _step("classify", str(val / "images"), "--server", address, "--model", CLASSIFIER,
              "--out", str(work / "results/classes.csv"), "--labels", str(val / "labels.csv"))
        _step("segment", str(val / "images"), "--server", address, "--model", SEGMENTER,
              "--gt", str(val / "masks"), "--out", str(work / "results/segment"))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        print("\nserver stopped", flush=True)


def _served_classes_below(work: Path, floor: float) -> dict[str, float]:
    """Classes whose dataset-level IoU through the server (the segment report) is below ``floor``."""
    report = json.loads((work / "results/segment/report.json").read_text())
    return {c["label"]: c["iou"] for c in report["iou"]["classes"] if c["iou"] is not None and c["iou"] < floor}


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    work = args.workdir.resolve()
    floor = 0.0 if args.quick else args.min_class_iou
    try:
        _train_and_export(work, args.quick, floor)
        if args.export_only:
            print(f"\nmodel repository ready in {work / 'models'} ({time.monotonic() - start:.0f} s)")
            return 0
        _serve_and_call(work, args.port)
    except subprocess.CalledProcessError as error:
        step = error.cmd[3]
        print(f"\ndemo failed: `visionserve {step} ...` exited with {error.returncode} (see above)",
              file=sys.stderr)
        return 1
    below = _served_classes_below(work, floor) if floor > 0 else {}
    if below:
        named = ", ".join(f"{name} {value:.4f}" for name, value in below.items())
        print(f"\ndemo failed: served IoU below the floor {floor} for {named} "
              f"(report: {work / 'results/segment/report.json'})", file=sys.stderr)
        return 1
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s; everything is under {work}")
    print(f"  masks:   {work / 'results/segment/masks'}   report: {work / 'results/segment/report.html'}")
    print(f"  models:  {work / 'models'}   (validation.json beside each model.onnx)")
    return 0
