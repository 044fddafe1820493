"""How close does ``visionserve segment`` get to the server's bare capacity?

Bare capacity: the model's backend called directly (no gRPC, no decode, no encode) on
preprocessed batches, at its best batch size, in images/s. CLI: ``visionserve segment``
end to end (files -> SegmentBatches -> masks + journal + IoU report) against a
``visionserve serve`` subprocess on the same machine and model. Prints both and the
ratio (goal >= 0.85), and CPU milliseconds per image of the client and the server
separately (the server's from /proc, all its threads; the client's from getrusage of
this process while the command runs, all its threads, its one-time costs included:
command import, planning, report and HTML with thumbnails). Two placements
(``--placement``): ``shared``, where client, server and bare use every core and the
wall-clock ratio is bounded by bare CPU-ms / (client + server CPU-ms) (printed too);
and ``split``, the server and bare on the first half of the cores and the CLI on the
rest, as beside a GPU server whose model does not compete with its clients for cores.
A figure, not a pass/fail test.

    python bench/bench_segment_cli.py                      # synthetic conv segmenter
    python bench/bench_segment_cli.py --repository REPO --model NAME   # a real model

Without ``--repository`` it writes a repository with a small convolutional segmenter
(3x3 convs, ``--channels`` wide, ``--layers`` deep) so inference, not the tiny test
models' near-zero compute, dominates the way it does for a real UNet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _backend import bare_line, served_line  # noqa: E402 - the bench folder is not a package
from _pinning import on_cpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("background", "a", "b", "c")


def conv_segmenter(channels: int, layers: int, classes: int = len(LABELS)):  # -> onnx.ModelProto
    """image [N,3,H,W] -> (3x3 conv + ReLU) x layers -> 1x1 conv -> ArgMax -> uint8 mask [N,H,W]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, previous, width = [], [], "image", 3
    for i in range(layers):
        w = (rng.standard_normal((channels, width, 3, 3)) / np.sqrt(9 * width)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        previous, width = f"r{i}", channels
    head = (rng.standard_normal((classes, width, 1, 1)) / np.sqrt(width)).astype(np.float32)
    inits += [
        numpy_helper.from_array(head, "head_w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "head_b"),
    ]
    nodes += [
        helper.make_node("Conv", [previous, "head_w", "head_b"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["classes"], axis=1, keepdims=0),
        helper.make_node("Cast", ["classes"], ["mask"], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes,
        "bench_segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("mask", TensorProto.UINT8, ["N", "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_bench_repository(
    repo: Path, size: int, channels: int, layers: int, max_batch: int
) -> str:
    sys.path.insert(0, str(ROOT / "tests/models"))
    import make_models
    from visionserve.server.model_config import InputSpec

    spec = InputSpec(
        name="image", height=size, width=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    make_models.write_entry(
        repo,
        "bench-segmenter",
        "segmentation",
        model=conv_segmenter(channels, layers),
        labels=LABELS,
        input=spec,
        max_batch_size=max_batch,
    )
    return "bench-segmenter"


def write_images(folder: Path, count: int, size: int, classes: int) -> tuple[Path, Path]:
    """``count`` PNG images of coloured blocks and random ground truth of the same size."""
    rng = np.random.default_rng(1)
    images, gts = folder / "images", folder / "gt"
    images.mkdir(parents=True)
    gts.mkdir()
    for i in range(count):
        blocks = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = cv2.resize(blocks, (size, size), interpolation=cv2.INTER_NEAREST)
        truth = cv2.resize(
            rng.integers(0, classes, (size // 16, size // 16), dtype=np.uint8),
            (size, size),
            interpolation=cv2.INTER_NEAREST,
        )
        cv2.imwrite(str(images / f"{i:05d}.png"), image)
        cv2.imwrite(str(gts / f"{i:05d}.png"), truth)
    return images, gts


def threads_for(instances: int, threads: int) -> int:
    """ONNX Runtime threads per instance: ``--threads``, or the server's own default."""
    from visionserve.server.backends.registry import auto_threads

    return threads or auto_threads(instances)


def bare_capacity(
    repo: Path, model: str, args: argparse.Namespace, batch_sizes: list[int]
) -> dict[tuple[int, int], tuple[float, float, int]]:
    """(images/s, CPU-s/img, threads per instance) of backend.infer on preprocessed batches per (instances,
    batch size): ``instances`` threads calling one backend at once, as the server's
    batcher instances do. At the tensor shape the server gives the bench's images
    (``input.mode``: the model's input size, or the image's shape bucket)."""
    from visionserve.server.preprocess import layout, preprocess_batch
    from visionserve.server.repository import ModelRepository
    from visionserve.server.backends.registry import load_backend

    entry = ModelRepository(repo).entry(model)
    spec = entry.config.input
    height, width = layout(args.image_size, args.image_size, spec).tensor
    image = np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rates = {}
    for instances in args.instance_counts:
        threads = threads_for(instances, args.threads)
        backend = load_backend(entry, threads)
        print(f"  {bare_line(backend)} ({instances} instance(s) x {threads} thread(s))")
        try:
            for batch in batch_sizes:
                feeds = {spec.name: preprocess_batch([image] * batch, spec)}
                rate, cpu = _run_bare(backend, feeds, instances, args.seconds)
                rates[instances, batch] = (rate, cpu, threads)
        finally:
            backend.close()
    return rates


def _run_bare(backend, feeds: dict, instances: int, seconds: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    import threading

    backend.infer(feeds)  # warm-up
    rows = next(iter(feeds.values())).shape[0]
    done = [0] * instances
    t0, cpu0 = time.perf_counter(), time.process_time()

    def loop(i: int) -> None:
        while time.perf_counter() - t0 < seconds:
            backend.infer(feeds)
            done[i] += rows

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(instances)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return sum(done) / wall, cpu / sum(done)


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class CliRun:
    """One ``visionserve segment`` run: images/s and CPU-ms per image of each side."""

    rate: float
    client_ms: float
    server_ms: float
    code: int

    @property
    def cpu_ms(self) -> float:
        return self.client_ms + self.server_ms


@dataclass(frozen=True)
class Placement:
    """Where things run: ``server`` CPUs (the server and bare), ``client`` CPUs (the CLI)."""

    name: str
    server: frozenset[int]
    client: frozenset[int]


def placements(which: str) -> list[Placement]:
    """``shared``: all on every CPU; ``split``: the server (and bare) on the first half of
    the CPUs, the CLI on the rest, as a GPU server's model does not compete with its
    clients for cores; ``both``."""
    cpus = sorted(os.sched_getaffinity(0))
    everything = frozenset(cpus)
    half = max(1, len(cpus) // 2)
    chosen = []
    if which in ("shared", "both"):
        chosen.append(Placement("shared", everything, everything))
    if which in ("split", "both") and len(cpus) >= 2:
        chosen.append(Placement("split", frozenset(cpus[:half]), frozenset(cpus[half:])))
    return chosen


def cli_rate(
    repo: Path,
    model: str,
    data: tuple[Path, Path, Path],
    args: argparse.Namespace,
    config: tuple[int, int] | None,
    placement: Placement,
) -> list[CliRun]:
    """``args.repeats`` runs of ``visionserve segment`` (fresh output folders) against one
    server subprocess, configured as bare's best ``config`` (instances, max batch size),
    as served_vs_bare.py does (None: model.yaml's batching, the default threads)."""
    images, gts, out = data
    with on_cpus(os.getpid(), placement.server):  # the server inherits them
        server, port = start_server(repo, args, config)
    try:
        print(f"  {served_line(f'127.0.0.1:{port}', model)}")
        command = ["segment", str(images), "--server", f"127.0.0.1:{port}", "--model", model]
        command += ["--gt", str(gts), "--no-progress", *args.cli_args]
        with on_cpus(os.getpid(), placement.client):
            return [
                one_cli_run(server.pid, command + ["--out", str(out / f"run{i}")], images)
                for i in range(args.repeats)
            ]
    finally:
        server.terminate()
        server.wait(30)


def start_server(
    repo: Path, args: argparse.Namespace, config: tuple[int, int] | None
) -> tuple[subprocess.Popen, int]:
    """A ``visionserve serve`` subprocess on a free port, started (``serving on`` seen)."""
    serve_args = ["--intra-op-threads", str(args.threads)]
    if config is not None:
        instances, batch = config
        serve_args = [
            *("--instances", str(instances), "--max-batch-size", str(batch)),
            *("--intra-op-threads", str(threads_for(instances, args.threads))),
        ]
    port = free_port()
    command = [sys.executable, "-m", "visionserve.cli", "--log-level", "WARNING", "serve"]
    command += ["--repository", str(repo), "--port", str(port), *serve_args]
    server = subprocess.Popen(command, stdout=subprocess.PIPE)
    if b"serving on" not in server.stdout.readline():
        server.kill()
        raise RuntimeError("the server did not start")
    return server, port


def one_cli_run(server_pid: int, command: list[str], images: Path) -> CliRun:
    from visionserve.cli import main

    count = len(list(images.iterdir()))
    t0, server0 = time.perf_counter(), process_cpu_seconds(server_pid)
    client0 = resource.getrusage(resource.RUSAGE_SELF)
    with contextlib.redirect_stdout(io.StringIO()):  # the IoU table
        code = main(["--log-level", "WARNING", *command])
    wall = time.perf_counter() - t0
    client1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = client1.ru_utime - client0.ru_utime + client1.ru_stime - client0.ru_stime
    server_cpu = process_cpu_seconds(server_pid) - server0
    return CliRun(count / wall, client_cpu / count * 1e3, server_cpu / count * 1e3, code)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repository", type=Path, help="existing model repository (default: synthetic)"
    )
    parser.add_argument("--model", help="segmentation model in --repository")
    parser.add_argument("--images", type=int, default=300, help="images to segment (default 300)")
    parser.add_argument(
        "--image-size", type=int, default=256, help="square image side in pixels (default 256)"
    )
    parser.add_argument(
        "--input-size", type=int, default=128, help="synthetic model input side (default 128)"
    )
    parser.add_argument(
        "--channels", type=int, default=32, help="synthetic model width (default 32)"
    )
    parser.add_argument("--layers", type=int, default=3, help="synthetic model depth (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads (default 0: all cores)",
    )
    parser.add_argument(
        "--batch-sizes", default="1,2,4,8", help="bare-capacity batch sizes (default 1,2,4,8)"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds per bare-capacity batch size"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="CLI runs against the same server, the best kept (default 2)",
    )
    parser.add_argument(
        "--instances",
        dest="instance_counts",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1, 2],
        help="batcher instances tried, bare and served (default 1,2; threads: cores / instances)",
    )
    parser.add_argument(
        "--model-batch",
        dest="match_batch",
        action="store_false",
        help="serve with model.yaml's max_batch_size (default: bare's best batch size)",
    )
    parser.add_argument(
        "--placement",
        choices=("shared", "split", "both"),
        default="both",
        help="shared: server, bare and CLI on every CPU; split: server and bare on the first "
        "half of the CPUs, the CLI on the rest (as a GPU server's model does not compete with "
        "its clients for cores); both (default)",
    )
    parser.add_argument(
        "cli_args", nargs="*", help="extra `visionserve segment` options (after --)"
    )
    args = parser.parse_args()
    if args.repository is not None and args.model is None:
        parser.error("--model is required with --repository")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        work = Path(tmp)
        batches = [int(b) for b in args.batch_sizes.split(",")]
        if args.repository is None:
            repo, model = (
                work / "repo",
                write_bench_repository(
                    work / "repo", args.input_size, args.channels, args.layers, max(batches)
                ),
            )
        else:
            repo, model = args.repository, args.model
        from visionserve.server.preprocess import layout
        from visionserve.server.repository import ModelRepository

        config = ModelRepository(repo).entry(model).config
        tensor_hw = layout(args.image_size, args.image_size, config.input).tensor
        images, gts = write_images(work / "data", args.images, args.image_size, len(config.labels))
        print(
            f"model {model}: {args.images} images of {args.image_size}x{args.image_size}, "
            f"{os.cpu_count()} CPUs; the model runs at {tensor_hw[0]}x{tensor_hw[1]}"
        )
        for placement in placements(args.placement):
            out = work / f"out-{placement.name}"
            measure_placement(repo, model, (images, gts, out), args, batches, placement)


def measure_placement(
    repo: Path,
    model: str,
    data: tuple[Path, Path, Path],
    args: argparse.Namespace,
    batches: list[int],
    placement: Placement,
) -> None:
    """Bare capacity on the server's CPUs, the CLI against a server there, the ratios.

    On a shared machine load comes and goes: bare capacity is measured before and after
    the CLI runs and the better figures kept (the ratios err on the low side)."""
    with on_cpus(os.getpid(), placement.server):
        before = bare_capacity(repo, model, args, batches)
    best = max(before, key=lambda k: before[k][0]) if args.match_batch else None
    runs = cli_rate(repo, model, data, args, best, placement)
    with on_cpus(os.getpid(), placement.server):
        after = bare_capacity(repo, model, args, batches)
    print_figures(placement, before, after, runs)


def print_figures(placement: Placement, before: dict, after: dict, runs: list[CliRun]) -> None:
    """Bare capacity per configuration, the CLI's figures, and the ratios."""
    rates = {
        k: (max(before[k][0], after[k][0]), min(before[k][1], after[k][1]), before[k][2])
        for k in before
    }
    best = max(rates, key=lambda k: rates[k][0])
    shared = placement.server == placement.client
    print(
        f"[{placement.name}] server and bare on CPUs {sorted(placement.server)}, "
        f"the CLI on CPUs {sorted(placement.client)}"
    )
    for (instances, batch), (r, cpu, threads) in rates.items():
        print(
            f"  bare backend, {instances} instance(s) x {threads} thread(s), batch {batch:>3}: "
            f"{r:8.1f} img/s  {cpu * 1e3:7.2f} CPU-ms/img"
        )
    bare_rate, bare_cpu, _ = rates[best]
    print(
        f"  bare capacity ({best[0]} instance(s), batch {best[1]}): {bare_rate:8.1f} img/s  "
        f"{bare_cpu * 1e3:7.2f} CPU-ms/img; the server runs with the best"
    )
    for i, run in enumerate(runs, start=1):
        print(
            f"  visionserve segment, run {i}:  {run.rate:8.1f} img/s  {run.cpu_ms:7.2f} CPU-ms/img "
            f"= client {run.client_ms:.2f} + server {run.server_ms:.2f} (exit {run.code})"
        )
    best_run = max(runs, key=lambda r: r.rate)
    print(
        f"  [{placement.name}] ratio CLI / bare, wall clock: {best_run.rate / bare_rate:.3f} "
        f"(goal >= 0.85)"
    )
    best_cpu = min(cpu for _, cpu, _ in rates.values()) * 1e3
    if shared:
        cpu_ms = min(r.cpu_ms for r in runs)
        print(
            f"  [{placement.name}] ratio CLI / bare, CPU time:   {best_cpu / cpu_ms:.3f} (the "
            f"wall-clock bound when client and server share the cores; bare {best_cpu:.2f} "
            f"CPU-ms/img)"
        )
    else:
        server_ms = min(r.server_ms for r in runs)
        print(
            f"  [{placement.name}] server CPU-ms/img over bare's: {server_ms / best_cpu:.3f} "
            f"(bare {best_cpu:.2f}, server {server_ms:.2f}; the client has CPUs of its own)"
        )


if __name__ == "__main__":
    main()
