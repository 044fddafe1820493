"""Served vs bare: throughput and batch-1 latency of one model, same machine, one run.

    python bench/served_vs_bare.py [--repository DIR] [--model NAME] [--clients 32] [--seconds 5] [--rounds 3]

- bare: the model's backend called directly (no gRPC, no batcher) on preprocessed
  tensors, at every batch size up to ``--max-batch``; the best batch size counts.
- served: a real ``visionserve serve`` process (max batch size = bare's best) and
  ``--clients`` concurrent single-image clients in separate processes, sending the
  same preprocessed tensor over KServe ``ModelInfer`` (the like-for-like figure), then
  raw uint8 images over ``visionserve.v1`` (adds server-side pre/post-processing).
- measured in interleaved rounds (bare, served, bare, ...), medians reported, so
  background load drifting during the run hits both sides alike.
- latency: one client, one image at a time: served p50 minus bare batch-1 p50.

Without ``--repository`` the tiny test models are generated (tiny compute, so the
serving overhead dominates the ratio). Real figures come from the demo models:
``visionserve demo --quick --export-only`` writes ``demo-output/models``. The clients
share the machine's cores with the server, as they would with Triton's perf_analyzer.
Prints figures; this is not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="model repository (default: tiny models)")
    parser.add_argument("--model", help="model name (default: the first in the repository)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="processes the clients are spread over (default 4)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--max-batch", type=int, default=32, help="largest bare batch tried")
    parser.add_argument(
        "--queue-delay-ms",
        type=float,
        default=0.0,
        help="server max_queue_delay_ms (default 0: batches form from the "
        "requests that queued while the previous batch ran)",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="ONNX Runtime threads, bare and served alike (default 1: on a "
        "2-core machine the other core serves gRPC and the clients; 0 = auto)",
    )
    parser.add_argument("--instances", type=int, default=1, help="server instances per model")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    parser.add_argument("--latency-requests", type=int, default=400)
    return parser.parse_args()


def tiny_repository(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    import make_models  # the test suite's model builder (needs onnx)

    print(
        "no --repository: using the tiny test models (serving overhead dominates). For real "
        "models: `visionserve demo --quick --export-only`, then --repository demo-output/models"
    )
    return make_models.write_repository(directory)


# -- bare ------------------------------------------------------------------------------------
class Bare:
    """The model's backend, called directly on a preprocessed tensor."""

    def __init__(self, entry, tensor: np.ndarray, intra_op_threads: int) -> None:
        from visionserve.server.served_model import load_backend

        self.backend = load_backend(entry, intra_op_threads)
        self.name = entry.config.input.name
        self.tensor = tensor

    def rate(self, batch_size: int, seconds: float) -> float:
        batch = np.ascontiguousarray(np.repeat(self.tensor, batch_size, axis=0))
        self.backend.infer({self.name: batch})  # warm
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            self.backend.infer({self.name: batch})
            count += 1
        return count * batch_size / elapsed

    def latencies(self, count: int) -> list[float]:
        out = []
        for _ in range(count):
            start = time.perf_counter()
            self.backend.infer({self.name: self.tensor})
            out.append((time.perf_counter() - start) * 1e3)
        return out


# -- served ----------------------------------------------------------------------------------
def start_server(repository: Path, max_batch: int, args: argparse.Namespace):
    command = [
        sys.executable,
        "-m",
        "visionserve.cli",
        "--log-level",
        "WARNING",
        "serve",
        "--repository",
        str(repository),
        "--port",
        "0",
        "--workers",
        str(args.clients + 8),
        "--max-batch-size",
        str(max_batch),
        "--max-queue-delay-ms",
        str(args.queue_delay_ms),
        "--intra-op-threads",
        str(args.intra_op_threads),
        "--max-queue-size",
        "1024",
        "--instances",
        str(args.instances),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        match = re.search(r"serving on .*:(\d+)$", line.strip())
        if match:
            return process, int(match.group(1))
    raise RuntimeError(f"the server exited (rc={process.wait()}) before serving")


def make_call(
    kind: str,
    channel,
    model: str,
    task: str,
    input_name: str,
    tensor: np.ndarray,
    image: np.ndarray,
):
    """A zero-argument function sending one request of ``kind`` ("kserve" or "v1")."""
    from visionserve.protos import grpc_service_pb2 as kpb
    from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc
    from visionserve.protos import visionserve_pb2 as pb
    from visionserve.protos import visionserve_pb2_grpc as pb_grpc

    if kind == "kserve":
        request = kpb.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="FP32", shape=list(tensor.shape))
        request.raw_input_contents.append(tensor.tobytes())
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        return lambda: stub.ModelInfer(request, timeout=60)
    raw = pb.Image(
        raw=pb.RawImage(
            data=image.tobytes(), height=image.shape[0], width=image.shape[1], channels=3
        )
    )
    stub = pb_grpc.VisionServiceStub(channel)
    if task == "classification":
        request = pb.ClassifyRequest(model=model, image=raw, top_k=1)
        return lambda: stub.Classify(request, timeout=60)
    request = pb.SegmentRequest(model=model, image=raw, mask_format=pb.MASK_FORMAT_RAW)
    return lambda: stub.Segment(request, timeout=60)


def client_process(
    address: str,
    model: str,
    task: str,
    input_name: str,
    tensor: np.ndarray,
    image: np.ndarray,
    threads: int,
    commands,
    results,
) -> None:
    """``threads`` closed-loop clients per command (kind, start_at, stop_at); puts counts."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        calls = {
            kind: make_call(kind, channel, model, task, input_name, tensor, image)
            for kind in ("kserve", "v1")
        }
        while (command := commands.get()) is not None:
            kind, start_at, stop_at = command
            counts = [0] * threads

            def loop(i: int, call, start_at: float, stop_at: float, counts: list[int]) -> None:
                while (now := time.time()) < stop_at:
                    call()
                    if now >= start_at:
                        counts[i] += 1

            workers = [
                threading.Thread(target=loop, args=(i, calls[kind], start_at, stop_at, counts))
                for i in range(threads)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            results.put(sum(counts))


class Clients:
    """``clients`` closed-loop clients spread over a few processes, kept across rounds."""

    def __init__(
        self,
        address: str,
        model: str,
        config,
        tensor: np.ndarray,
        image: np.ndarray,
        args: argparse.Namespace,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        n = max(1, min(args.client_processes, args.clients))
        per = [args.clients // n + (i < args.clients % n) for i in range(n)]
        self.commands = [ctx.Queue() for _ in per]
        self.procs = [
            ctx.Process(
                target=client_process,
                args=(
                    address,
                    model,
                    config.task,
                    config.input.name,
                    tensor,
                    image,
                    threads,
                    commands,
                    self.results,
                ),
                daemon=True,
            )
            for threads, commands in zip(per, self.commands, strict=True)
        ]
        for proc in self.procs:
            proc.start()

    def rate(self, kind: str, seconds: float, warmup: float = 1.0) -> float:
        start_at = time.time() + warmup
        for commands in self.commands:
            commands.put((kind, start_at, start_at + seconds))
        total = sum(self.results.get(timeout=seconds + warmup + 120) for _ in self.procs)
        return total / seconds

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for proc in self.procs:
            proc.join(30)


def served_latencies(address: str, model: str, config, tensor: np.ndarray, count: int):
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = make_call("kserve", channel, model, config.task, config.input.name, tensor, None)
        for _ in range(10):
            call()
        out = []
        for _ in range(count):
            start = time.perf_counter()
            call()
            out.append((time.perf_counter() - start) * 1e3)
        return out


def measure(
    bare: Bare, clients: Clients, address: str, model: str, config, tensor, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Interleaved rounds (bare, served KServe, served v1), so drifting background load
    hits both sides alike; batch-1 latencies in alternating blocks likewise."""
    figures: dict[str, list[float]] = {
        "bare": [],
        "kserve": [],
        "v1": [],
        "lat_bare": [],
        "lat_served": [],
    }
    for _ in range(args.rounds):
        figures["bare"].append(bare.rate(args.best, args.seconds))
        figures["kserve"].append(clients.rate("kserve", args.seconds))
        figures["v1"].append(clients.rate("v1", args.seconds))
    block = max(1, args.latency_requests // 10)
    for _ in range(10):
        figures["lat_bare"] += bare.latencies(block)
        figures["lat_served"] += served_latencies(address, model, config, tensor, block)
    return figures


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    from visionserve.server.preprocess import preprocess
    from visionserve.server.repository import ModelRepository

    with tempfile.TemporaryDirectory() as tmp:
        repository = args.repository or tiny_repository(Path(tmp))
        repo = ModelRepository(repository)
        model = args.model or repo.model_names()[0]
        entry = repo.entry(model)
        spec = entry.config.input
        image = np.random.default_rng(0).integers(0, 256, (spec.height, spec.width, 3), np.uint8)
        tensor = preprocess(image, spec)[None].astype(np.float32)
        print(f"model {model} v{entry.version} ({entry.config.task}), input {list(tensor.shape)}")
        bare = Bare(entry, tensor, args.intra_op_threads)
        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= args.max_batch]
        sweep = {b: bare.rate(b, max(1.0, args.seconds / 2)) for b in sizes}
        for size, rate in sweep.items():
            print(f"  bare batch {size:3d}: {rate:10.1f} images/s")
        args.best = max(sweep, key=sweep.get)
        process, port = start_server(repository, args.best, args)
        address = f"127.0.0.1:{port}"
        clients = Clients(address, model, entry.config, tensor, image, args)
        try:
            figures = measure(bare, clients, address, model, entry.config, tensor, args)
        finally:
            clients.close()
            process.terminate()
            process.wait(timeout=60)
    report(figures, args)
    return 0


def report(figures: dict[str, list[float]], args: argparse.Namespace) -> None:
    med = statistics.median
    bare_rate = med(figures["bare"])
    print(
        f"\n{args.rounds} interleaved rounds of {args.seconds:g} s; medians "
        f"(server: max batch {args.best}, queue delay {args.queue_delay_ms} ms, "
        f"{args.instances} instance(s); {args.clients} clients)"
    )
    print(f"bare   backend direct, batch {args.best:<3d}        {bare_rate:10.1f} images/s")
    for kind, label in (
        ("kserve", "KServe ModelInfer, 1 image "),
        ("v1", "visionserve.v1, raw image"),
    ):
        rate = med(figures[kind])
        ratios = [s / b for s, b in zip(figures[kind], figures["bare"], strict=True)]
        print(
            f"served {label}  {rate:10.1f} images/s   ratio {rate / bare_rate:.3f} "
            f"(per round {', '.join(f'{r:.2f}' for r in ratios)})"
        )
    lat_bare, lat_served = med(figures["lat_bare"]), med(figures["lat_served"])
    print(
        f"batch-1 latency p50: bare {lat_bare:.3f} ms, served (KServe) {lat_served:.3f} ms, "
        f"added {lat_served - lat_bare:.3f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
