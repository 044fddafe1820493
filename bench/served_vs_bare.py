"""Served vs bare: throughput and batch-1 latency of one model, same machine, one run.

    python bench/served_vs_bare.py [--repository DIR] [--model NAME] [--clients 32] [--seconds 5] [--rounds 3]

- bare: the model's backend called directly (no gRPC, no batcher) on preprocessed
  tensors, at every batch size up to ``--max-batch``; the best batch size counts.
- served: a real ``visionserve serve`` process (max batch size = bare's best) and
  ``--clients`` concurrent closed-loop single-image clients (grpc.aio, one event loop
  per client process, requests serialised once and sent as bytes, like Triton's
  perf_analyzer), sending the same preprocessed tensor over KServe ``ModelInfer`` (the
  like-for-like figure), then raw uint8 images over ``visionserve.v1`` (adds
  server-side pre/post-processing).
- CPU: what the server, the clients and every other process on the machine used
  while served was measured (ms of CPU per image; other processes in cores), so a
  ratio below 1 can be traced to the server, to the load generator or to neighbours.
- measured in interleaved rounds (bare, served, bare, ...), medians reported, so
  background load drifting during the run hits both sides alike.
- latency: one client, one image at a time: served p50 minus bare batch-1 p50; measured
  as the machine schedules it, then again with every server thread on CPU 0 and the
  client (and bare) on the last CPU, as a load generator gets cores of its own (the bare
  figure kept is the lower one).

Without ``--repository`` the tiny test models are generated (tiny compute, so the
serving overhead dominates the ratio). Real figures come from the demo models:
``visionserve demo --quick --export-only`` writes ``demo-output/models``. The clients
share the machine's cores with the server, as they would with Triton's perf_analyzer.
Prints figures; this is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _backend import bare_line, served_line
from _pinning import pinned


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="model repository (default: tiny models)")
    parser.add_argument("--model", help="model name (default: the first in the repository)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes the clients are spread over, each one grpc.aio event loop (default 1)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--max-batch", type=int, default=32, help="largest bare batch tried")
    parser.add_argument(
        "--queue-delay-ms",
        type=float,
        default=0.0,
        help="server max_queue_delay_ms (default 0: batches form from the requests that "
        "queued while the previous batch ran; batching is adaptive either way: an idle "
        "model runs a lone request at once, a busy one gathers up to this delay)",
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
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="skip the second latency measurement with the server on CPU 0 and the client "
        "on its own CPU (done by default when there are 2 or more CPUs)",
    )
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
        from visionserve.server.backends.registry import load_backend

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
        "--max-batch-size",
        str(max_batch),
        "--max-queue-delay-ms",
        str(args.queue_delay_ms),
        "--intra-op-threads",
        str(args.intra_op_threads),
        "--max-queue-size",
        "1024",
        "--max-admitted",  # the closed loop holds --clients in flight by design: admit them
        str(max(1024, args.clients)),
        "--instances",
        str(args.instances),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        match = re.search(r"serving on .*:(\d+)$", line.strip())
        if match:
            return process, int(match.group(1))
    raise RuntimeError(f"the server exited (rc={process.wait()}) before serving")


METHODS = {
    "kserve": "/inference.GRPCInferenceService/ModelInfer",
    "classification": "/visionserve.v1.VisionService/Classify",
    "segmentation": "/visionserve.v1.VisionService/Segment",
}


def request_bytes(
    kind: str, model: str, task: str, input_name: str, tensor: np.ndarray, image: np.ndarray
) -> tuple[str, bytes]:
    """``(method, serialised request)`` for ``kind`` ("kserve" or "v1"), built once.

    The load generator sends these bytes as they are (no per-call protobuf work), as
    Triton's perf_analyzer sends prepared requests: client CPU per call stays small,
    and on a 2-core machine every client cycle is taken from the server.
    """
    from visionserve.protos import grpc_service_pb2 as kpb
    from visionserve.protos import visionserve_pb2 as pb

    if kind == "kserve":
        request = kpb.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="FP32", shape=list(tensor.shape))
        request.raw_input_contents.append(tensor.tobytes())
        return METHODS["kserve"], request.SerializeToString()
    raw = pb.Image(
        raw=pb.RawImage(
            data=image.tobytes(), height=image.shape[0], width=image.shape[1], channels=3
        )
    )
    if task == "classification":
        request = pb.ClassifyRequest(model=model, image=raw, top_k=1)
    else:
        request = pb.SegmentRequest(model=model, image=raw, mask_format=pb.MASK_FORMAT_RAW)
    return METHODS[task], request.SerializeToString()


def check_response(kind: str, task: str, data: bytes) -> None:
    """Parse one answer, so the benchmark cannot count error-free garbage."""
    from visionserve.protos import grpc_service_pb2 as kpb
    from visionserve.protos import visionserve_pb2 as pb

    if kind == "kserve":
        response = kpb.ModelInferResponse.FromString(data)
        ok = len(response.raw_output_contents) == len(response.outputs) > 0
    elif task == "classification":
        ok = len(pb.ClassifyResponse.FromString(data).top) == 1
    else:
        ok = len(pb.SegmentResponse.FromString(data).mask.data) > 0
    if not ok:
        raise RuntimeError(f"the server answered {kind} with an unexpected response")


async def _closed_loop(address: str, requests: dict, clients: int, commands, results) -> None:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        calls = {
            kind: (channel.unary_unary(method), data) for kind, (method, data) in requests.items()
        }
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, commands.get)) is not None:
            kind, start_at, stop_at = command
            counts = [0] * clients
            await asyncio.gather(
                *(_client(*calls[kind], start_at, stop_at, counts, i) for i in range(clients))
            )
            results.put(sum(counts))


async def _client(call, data: bytes, start_at: float, stop_at: float, counts: list, i: int) -> None:
    while (now := time.time()) < stop_at:
        await call(data, timeout=60)
        if now >= start_at:
            counts[i] += 1


def client_process(address: str, requests: dict, clients: int, commands, results) -> None:
    """``clients`` closed-loop single-request clients (grpc.aio, one event loop) per
    command ``(kind, start_at, stop_at)``; puts how many calls started in the window."""
    asyncio.run(_closed_loop(address, requests, clients, commands, results))


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (``/proc``), or of the whole machine."""
    if pid is None:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return (sum(values) - values[3] - values[4]) / CLOCK_TICKS
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by named processes and by the whole machine over a window."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        out["machine"] = cpu_seconds()
        out["wall"] = time.time()
        return out

    @staticmethod
    def usage(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Cores used per name, and ``other``: what the rest of the machine used."""
        wall = after["wall"] - before["wall"]
        cores = {k: (after[k] - before[k]) / wall for k in before if k != "wall"}
        cores["other"] = cores["machine"] - sum(v for k, v in cores.items() if k != "machine")
        return cores


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
        requests = {
            kind: request_bytes(kind, model, config.task, config.input.name, tensor, image)
            for kind in ("kserve", "v1")
        }
        import grpc

        with grpc.insecure_channel(address) as channel:  # one checked call of each kind
            for kind, (method, data) in requests.items():
                check_response(kind, config.task, channel.unary_unary(method)(data, timeout=60))
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        n = max(1, min(args.client_processes, args.clients))
        per = [args.clients // n + (i < args.clients % n) for i in range(n)]
        self.commands = [ctx.Queue() for _ in per]
        self.procs = [
            ctx.Process(
                target=client_process,
                args=(address, requests, clients, commands, self.results),
                daemon=True,
            )
            for clients, commands in zip(per, self.commands, strict=True)
        ]
        for proc in self.procs:
            proc.start()

    def rate(self, kind: str, seconds: float, meter: CpuMeter, warmup: float = 1.0):
        """Images/s of ``kind``, and the cores each side used while it was measured."""
        start_at = time.time() + warmup
        for commands in self.commands:
            commands.put((kind, start_at, start_at + seconds))
        time.sleep(max(0.0, start_at - time.time()))
        before = meter.sample()
        time.sleep(max(0.0, start_at + seconds - time.time()))
        after = meter.sample()
        total = sum(self.results.get(timeout=seconds + warmup + 120) for _ in self.procs)
        return total / seconds, CpuMeter.usage(before, after)

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for proc in self.procs:
            proc.join(30)


def served_latencies(address: str, method: str, data: bytes, count: int) -> list[float]:
    """Milliseconds per call of one client sending ``data`` one call at a time."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        for _ in range(10):
            call(data, timeout=60)
        out = []
        for _ in range(count):
            start = time.perf_counter()
            call(data, timeout=60)
            out.append((time.perf_counter() - start) * 1e3)
        return out


def measure(
    bare: Bare,
    clients: Clients,
    meter: CpuMeter,
    address: str,
    kserve: tuple[str, bytes],
    args: argparse.Namespace,
    server_pid: int,
) -> dict[str, list]:
    """Interleaved rounds (bare, served KServe, served v1), so drifting background load
    hits both sides alike; batch-1 latencies in alternating blocks likewise."""
    figures: dict[str, list] = {
        key: [] for key in ("bare", "kserve", "v1", "lat_bare", "lat_served")
    }
    for _ in range(args.rounds):
        before = meter.sample()
        rate = bare.rate(args.best, args.seconds)
        figures["bare"].append((rate, CpuMeter.usage(before, meter.sample())))
        for kind in ("kserve", "v1"):
            figures[kind].append(clients.rate(kind, args.seconds, meter))
    block = max(1, args.latency_requests // 10)
    for _ in range(10):
        figures["lat_bare"] += bare.latencies(block)
        figures["lat_served"] += served_latencies(address, *kserve, block)
    if args.pin:
        with pinned(server_pid):
            figures["pin_bare"], figures["pin_served"] = [], []
            for _ in range(10):
                figures["pin_bare"] += bare.latencies(block)
                figures["pin_served"] += served_latencies(address, *kserve, block)
    return figures


def main() -> int:
    args = parse_args()
    args.pin = args.pin and len(os.sched_getaffinity(0)) >= 2
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
        print(bare_line(bare.backend))
        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= args.max_batch]
        sweep = {b: bare.rate(b, max(1.0, args.seconds / 2)) for b in sizes}
        for size, rate in sweep.items():
            print(f"  bare batch {size:3d}: {rate:10.1f} images/s")
        args.best = max(sweep, key=sweep.get)
        process, port = start_server(repository, args.best, args)
        address = f"127.0.0.1:{port}"
        print(served_line(address, model, bare.backend))
        kserve = request_bytes("kserve", model, entry.config.task, spec.name, tensor, image)
        clients = Clients(address, model, entry.config, tensor, image, args)
        meter = CpuMeter(
            {
                "bench": [os.getpid()],
                "server": [process.pid],
                "clients": [p.pid for p in clients.procs],
            }
        )
        try:
            figures = measure(bare, clients, meter, address, kserve, args, process.pid)
        finally:
            clients.close()
            process.terminate()
            process.wait(timeout=60)
    report(figures, args)
    return 0


def _others(rounds: list) -> str:
    return ", ".join(f"{cpu['other']:.2f}" for _, cpu in rounds)


def report(figures: dict[str, list], args: argparse.Namespace) -> None:
    med = statistics.median
    bare_rates = [rate for rate, _ in figures["bare"]]
    bare_rate = med(bare_rates)
    bare_cpu = med(cpu["bench"] / rate * 1e3 for rate, cpu in figures["bare"])
    print(
        f"\n{args.rounds} interleaved rounds of {args.seconds:g} s; medians "
        f"(server: max batch {args.best}, queue delay {args.queue_delay_ms} ms, "
        f"{args.instances} instance(s), {args.intra_op_threads} ONNX Runtime thread(s); "
        f"{args.clients} clients in {args.client_processes} process(es))"
    )
    print(
        f"bare   backend direct, batch {args.best:<3d}        {bare_rate:10.1f} images/s   "
        f"CPU {bare_cpu:.3f} ms/image; other processes "
        f"{_others(figures['bare'])} cores"
    )
    for kind, label in (
        ("kserve", "KServe ModelInfer, 1 image "),
        ("v1", "visionserve.v1, raw image"),
    ):
        rates = [rate for rate, _ in figures[kind]]
        rate = med(rates)
        ratios = [s / b for s, b in zip(rates, bare_rates, strict=True)]
        server = med(cpu["server"] / r * 1e3 for r, cpu in figures[kind])
        client = med(cpu["clients"] / r * 1e3 for r, cpu in figures[kind])
        print(
            f"served {label}  {rate:10.1f} images/s   ratio {rate / bare_rate:.3f} "
            f"(per round {', '.join(f'{r:.2f}' for r in ratios)})\n"
            f"       CPU: server {server:.3f} ms/image, clients {client:.3f} ms/image; "
            f"other processes {_others(figures[kind])} cores"
        )
    lat_bare, lat_served = med(figures["lat_bare"]), med(figures["lat_served"])
    print(
        f"batch-1 latency p50, unpinned: bare {lat_bare:.3f} ms, served (KServe) "
        f"{lat_served:.3f} ms, added {lat_served - lat_bare:.3f} ms"
    )
    if "pin_served" in figures:
        # The lower of the two bare figures: the added latency errs on the high side.
        pin_bare = min(lat_bare, med(figures["pin_bare"]))
        pin_served = med(figures["pin_served"])
        print(
            f"batch-1 latency p50, server on CPU 0, client on its own CPU: bare {pin_bare:.3f} ms "
            f"(the lower of pinned {med(figures['pin_bare']):.3f} and unpinned), served (KServe) "
            f"{pin_served:.3f} ms, added {pin_served - pin_bare:.3f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
