"""Served vs in-process, overload, many streams and health under load: one real server.

    python bench/overload.py [--imagenet DIR | --repository DIR --model NAME]
                             [--seconds 60] [--factor 2] [--deadline-ms 2000] [--streams 1000]
                             [--client-slice-us 100]

Against ``visionserve serve`` with its default settings (batching on: the model.yaml
queue delay and batch size; admission control on), one process of grpc.aio clients:

1. batch-1 p50 of decode + normalise + infer in this process (bare) and of one client
   sending one PNG at a time (visionserve.v1), in interleaved rounds (bare, served, ...):
   the machine's speed drifting hits both alike; the added latency is the median of the
   rounds' differences. Interleaved with them, the front end's floor: the same request
   bytes naming a model the server does not have (sent, parsed, answered NOT_FOUND, no
   work): what any request of that size costs; added minus floor is the pipeline's own.
   The floor is measured twice: back to back, and each call a bare inference's time after
   the last answer (threads asleep and caches cold for as long as during a served call).
2. images/s: bare at the model's max batch size (before and after the served figure,
   averaged) and served with 32 requests in flight: the capacity.
3. overload: an open loop at ``--factor`` x capacity for ``--seconds``, each request with
   ``--deadline-ms``: goodput (answered OK within the deadline) / capacity, how the excess
   was refused (RESOURCE_EXHAUSTED, and how fast) or timed out; a health Check every 100 ms
   throughout, from a process of its own as a kubelet probe (its latency is the server's,
   not that of this process's loop, which a heavy load saturates).
4. streams: ``--streams`` concurrent SegmentStream calls on the tiny test segmenter (the
   front end is measured, not compute), each sending 2 requests one after the other: how
   many were answered, the slowest first answer, health Check latency meanwhile.

``--imagenet DIR``: ResNet-18 (random weights) and 224x224 PNGs of ~110 KB, written by
``bench/make_imagenet.py DIR`` when missing. Without a workload, the tiny test models.
The clients share the machine's cores with the server. Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _watch import HealthProbe, ResidentMemory, loop_lag  # noqa: E402 - the bench folder is not a package


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imagenet", type=Path, help="ImageNet-shaped workload directory")
    parser.add_argument("--repository", type=Path, help="model repository (default: tiny models)")
    parser.add_argument("--model", help="model name (default: the first in the repository)")
    parser.add_argument("--seconds", type=float, default=60.0, help="overload duration")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--rate", type=float, help="offered requests/s in the overload phase "
                        "instead of --factor x capacity (to compare server settings at one rate)")
    parser.add_argument("--deadline-ms", type=float, default=2000.0)
    parser.add_argument("--image-side", type=int, help="tiny workload: random PNGs of this "
                        "side instead of the model's input size (large images, resized by the "
                        "server; the client's images/s and the server's memory under overload)")
    parser.add_argument("--in-flight", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--client-slice-us", type=int, default=0, help="this bench's own "
                        "threads on that scheduler time slice (Linux >= 6.12), like the server's "
                        "front end (--front-slice-us): the client sharing the cores then wakes "
                        "as promptly as one on another machine would; 0 = left alone")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="an extra `visionserve serve` argument for the measured server, "
                        "e.g. --server-arg=--accept-ahead=0 (repeatable)")
    return parser.parse_args()


def start_server(repository: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "visionserve.cli", "--log-level", "WARNING", "serve",
               "--repository", str(repository), "--port", "0", *extra]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"serving on .*:(\d+)$", line.strip())
        if match:
            return process, int(match.group(1))
    raise RuntimeError(f"the server exited (rc={process.wait()}) before serving")


def workload(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, list[bytes]]:
    """(repository, model, encoded images)."""
    import cv2

    if args.imagenet is not None:
        subprocess.run([sys.executable, str(BENCH / "make_imagenet.py"), str(args.imagenet)], check=True)
        images = sorted((args.imagenet / "images").glob("*.png"))
        return args.imagenet / "models", "resnet18", [p.read_bytes() for p in images]
    repository = args.repository or tiny_repository(tmp / "tiny")
    from visionserve.server.repository import ModelRepository

    repo = ModelRepository(repository)
    model = args.model or repo.model_names()[0]
    spec = repo.entry(model).config.input
    height, width = (args.image_side,) * 2 if args.image_side else (spec.height, spec.width)
    rng = np.random.default_rng(0)
    encoded = [
        cv2.imencode(".png", rng.integers(0, 256, (height, width, 3), np.uint8))[1].tobytes()
        for _ in range(16)
    ]
    return repository, model, encoded


def tiny_repository(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    import make_models

    return make_models.write_repository(directory)


# -- bare: decode + normalise + infer in this process -------------------------------------------
class Bare:
    """The model's backend in this process: decode + normalise + infer, as the server does."""

    def __init__(self, repository: Path, model: str, images: list[bytes]) -> None:
        from visionserve.server.backends.registry import load_backend
        from visionserve.server.repository import ModelRepository

        entry = ModelRepository(repository).entry(model)
        self.config, self.images = entry.config, images
        self.backend = load_backend(entry, 0)
        self.batch = self.config.max_batch_size

    def tensor(self, data: bytes) -> np.ndarray:
        from visionserve.server.codec import decode_image
        from visionserve.server.preprocess import preprocess

        return preprocess(decode_image(data, 40_000_000), self.config.input)[None]

    def latencies(self, count: int, first: int = 0) -> list[float]:
        """Milliseconds of ``count`` single images, one after the other."""
        name, lat = self.config.input.name, []
        for i in range(first, first + count):
            start = time.perf_counter()
            self.backend.infer({name: self.tensor(self.images[i % len(self.images)])})
            lat.append((time.perf_counter() - start) * 1e3)
        return lat

    def rate(self, seconds: float) -> float:
        """Images/s at the model's max batch size."""
        name, count, start = self.config.input.name, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            rows = [self.tensor(self.images[(count + j) % len(self.images)]) for j in range(self.batch)]
            self.backend.infer({name: np.concatenate(rows)})
            count += self.batch
        return count / (time.perf_counter() - start)


# -- served ----------------------------------------------------------------------------------------
def request_bytes(model: str, task: str, data: bytes) -> tuple[str, bytes]:
    from visionserve.protos import visionserve_pb2 as pb

    image = pb.Image(encoded=data)
    if task == "classification":
        return "/visionserve.v1.VisionService/Classify", pb.ClassifyRequest(
            model=model, image=image, top_k=5
        ).SerializeToString()
    return "/visionserve.v1.VisionService/Segment", pb.SegmentRequest(
        model=model, image=image
    ).SerializeToString()


async def _p50_ms(call, requests: list[bytes], first: int, count: int, pause: float = 0.0) -> float:
    """Median round trip of ``count`` calls one after the other, each ``pause`` seconds
    after the last answer; an error answer counts."""
    import grpc

    lat = []
    for i in range(first, first + count):
        if pause:
            await asyncio.sleep(pause)
        start = time.perf_counter()
        try:
            await call(requests[i % len(requests)], timeout=60)
        except grpc.aio.AioRpcError:
            pass
        lat.append((time.perf_counter() - start) * 1e3)
    return statistics.median(lat)


async def latency_rounds(channel, method: str, requests: list[bytes], floor: list[bytes],
                         bare: Bare, count: int, rounds: int = 6) -> dict[str, float]:
    """Batch-1 p50 of bare, served and the front end's floor (the same bytes for a model
    the server does not have: transfer, parse and answer, no work) in interleaved blocks,
    so the machine's speed drifting during the run hits all alike; medians over rounds.
    The floor twice: back to back, and each call a bare inference's time after the last
    (a served call's threads idle, and its caches go cold, for that long)."""
    call = channel.unary_unary(method)
    await _p50_ms(call, requests, 0, 10)
    await _p50_ms(call, floor, 0, 10)
    bare.latencies(10)
    per = max(1, count // rounds)
    bare_p50, served_p50, floor_p50, paused_p50 = [], [], [], []
    for r in range(rounds):
        bare_p50.append(statistics.median(bare.latencies(per, r * per)))
        served_p50.append(await _p50_ms(call, requests, r * per, per))
        floor_p50.append(await _p50_ms(call, floor, r * per, per))
        paused_p50.append(await _p50_ms(call, floor, r * per, per, bare_p50[-1] / 1e3))
    added = [s - b for s, b in zip(served_p50, bare_p50)]
    above = [a - f for a, f in zip(added, floor_p50)]
    above_paused = [a - f for a, f in zip(added, paused_p50)]
    return {"bare_p50_ms": statistics.median(bare_p50), "p50_ms": statistics.median(served_p50),
            "added_ms": statistics.median(added), "added_range": (min(added), max(added)),
            "floor_ms": statistics.median(floor_p50), "above_floor_ms": statistics.median(above),
            "paused_floor_ms": statistics.median(paused_p50),
            "above_paused_ms": statistics.median(above_paused)}


async def closed_loop(
    channel, method: str, requests: list[bytes], clients: int, seconds: float
) -> tuple[float, int]:
    """Answers/s with ``clients`` in flight (a client refused RESOURCE_EXHAUSTED by
    admission control, at its limit, retries 5 ms later: the model stays saturated)."""
    import grpc

    call = channel.unary_unary(method)
    stop_at, counts, refused = time.monotonic() + seconds, [0] * clients, [0]

    async def client(i: int) -> None:
        while time.monotonic() < stop_at:
            try:
                await call(requests[(i + counts[i] * clients) % len(requests)], timeout=60)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused[0] += 1
                await asyncio.sleep(0.005)
                continue
            counts[i] += 1

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return sum(counts) / (time.monotonic() - start), refused[0]


async def open_loop(channel, method, requests, rate: float, seconds: float, deadline: float):
    """Requests at ``rate``/s for ``seconds``, each with ``deadline``; outcomes."""
    import grpc

    call, outcomes = channel.unary_unary(method), []

    async def one(data: bytes) -> None:
        start = time.perf_counter()
        try:
            await call(data, timeout=deadline)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        outcomes.append((code, time.perf_counter() - start))

    tasks, start, i = [], time.monotonic(), 0
    while (now := time.monotonic()) < start + seconds:
        due = start + i / rate
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.ensure_future(one(requests[i % len(requests)])))
        i += 1
    await asyncio.gather(*tasks)
    return outcomes, i / seconds


async def streams_figures(address: str, count: int) -> dict[str, float]:
    import grpc
    import make_models
    from visionserve.protos import visionserve_pb2 as pb
    from visionserve.protos import visionserve_pb2_grpc as pb_grpc

    image = pb.Image(raw=pb.RawImage(data=bytes(32 * 32 * 3), height=32, width=32, channels=3))
    request = pb.SegmentRequest(model=make_models.SEGMENTER, image=image)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        firsts: list[float] = []

        async def stream() -> str:
            """"OK", or what the stream got instead (an in-band error, a call's status)."""
            call = stub.SegmentStream(timeout=120)
            failures = []
            for k in range(2):
                await call.write(request)
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    return "ended early"
                if reply.error_code != 0:
                    failures.append(f"in-band code {reply.error_code}: {reply.error_message}"[:160])
                if k == 0:
                    firsts.append(time.perf_counter() - start)
            await call.done_writing()
            await call.read()
            return failures[0] if failures else "OK"

        with HealthProbe(address) as health:
            start = time.perf_counter()  # the probe is up: its start-up is not the streams'
            outcomes = await asyncio.gather(*(stream() for _ in range(count)), return_exceptions=True)
    failed = collections.Counter(_stream_failure(o) for o in outcomes if o != "OK")
    return {"streams": count, "answered": count - sum(failed.values()), "failed": dict(failed),
            "slowest_first_s": max(firsts or [0]), "all_s": time.perf_counter() - start,
            "health_max_s": max(health.seconds or [0]), "health_checks": len(health.seconds),
            "health_failed": health.failed}  # fmt: skip


def _stream_failure(outcome: object) -> str:
    """A stream's failure, in words: its status code and details, or what it got in-band."""
    details = getattr(outcome, "details", None)
    if callable(details):
        return f"{outcome.code().name}: {details()}"[:160]
    return str(outcome)[:160]


async def served_figures(address: str, method: str, requests: list[bytes], floor: list[bytes],
                         bare: Bare, args, pid: int) -> dict:
    import grpc

    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        figures = await latency_rounds(channel, method, requests, floor, bare, args.latency_requests)
        before = bare.rate(args.capacity_seconds / 2)
        capacity, refused = await closed_loop(
            channel, method, requests, args.in_flight, args.capacity_seconds
        )
        after = bare.rate(args.capacity_seconds / 2)
        figures.update(capacity=capacity, capacity_refused=refused, bare_rate=(before + after) / 2,
                       bare_rates=(before, after))
        stop = asyncio.Event()
        lag = asyncio.ensure_future(loop_lag(stop))
        with ResidentMemory(pid) as memory, HealthProbe(address) as health:
            outcomes, offered = await open_loop(
                channel, method, requests, args.rate or args.factor * capacity, args.seconds,
                args.deadline_ms / 1e3,
            )
            stop.set()
            await asyncio.sleep(1)
        figures.update(offered=offered, outcomes=outcomes, health=health.seconds, client_lag=await lag,
                       health_failed=health.failed, memory=(memory.before, memory.peak, memory.now()))
    return figures


def report(served: dict, streams: dict, args) -> None:
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    outcomes = served["outcomes"]
    ok = [s for code, s in outcomes if code == "OK" and s <= args.deadline_ms / 1e3]
    shed = [s for code, s in outcomes if code == "RESOURCE_EXHAUSTED"]
    codes = {code: sum(1 for c, _ in outcomes if c == code) for code in {c for c, _ in outcomes}}
    goodput = len(ok) / args.seconds
    low, high = served["added_range"]
    print(f"batch-1 p50, bare (decode + normalise + infer, this process) and served (default "
          f"settings, batching on) in interleaved rounds: bare {served['bare_p50_ms']:.2f} ms, "
          f"served {served['p50_ms']:.2f} ms, added {served['added_ms']:+.2f} ms (median of the "
          f"rounds' differences; {low:+.2f} .. {high:+.2f})")
    print(f"  of which the front end's floor (the same request bytes for a model the server does "
          f"not have: transfer + parse + an error answer) {served['floor_ms']:.2f} ms, the rest "
          f"{served['above_floor_ms']:+.2f} ms (median of the rounds' differences)")
    print(f"  the same floor request sent a bare inference's time after the last answer "
          f"{served['paused_floor_ms']:.2f} ms (gRPC's own cost once its threads have slept and "
          f"its caches gone cold, as they do during a served inference); the rest above it "
          f"{served['above_paused_ms']:+.2f} ms")
    print(f"bare at batch {served['batch']}: {served['bare_rate']:.1f} images/s (before/after served: "
          f"{served['bare_rates'][0]:.1f} / {served['bare_rates'][1]:.1f}); served, {args.in_flight} in "
          f"flight: {served['capacity']:.1f} images/s = {served['capacity'] / served['bare_rate']:.3f} "
          f"of bare ({served['capacity_refused']} refused RESOURCE_EXHAUSTED and retried 5 ms later)")
    factor = served["offered"] / served["capacity"]
    print(f"overload {factor:.2f}x for {args.seconds:g} s ({served['offered']:.1f} requests/s offered, "
          f"deadline {args.deadline_ms:g} ms): goodput {goodput:.1f}/s = "
          f"{goodput / served['capacity']:.3f} of capacity; outcomes {codes}")
    print(f"  shed RESOURCE_EXHAUSTED: p50 {pct(shed, 0.5) * 1e3:.2f} ms, p99 {pct(shed, 0.99) * 1e3:.2f} ms; "
          f"OK latency p50 {pct(ok, 0.5) * 1e3:.0f} ms, p99 {pct(ok, 0.99) * 1e3:.0f} ms")
    lag = served["client_lag"]
    print(f"  this client's event loop late by p50 {pct(lag, 0.5) * 1e3:.1f} ms, p99 {pct(lag, 0.99) * 1e3:.1f} ms"
          + (" (the client could not keep up: latencies above are largely its own)"
             if pct(lag, 0.99) > 0.05 else ""))
    before, peak, after = served["memory"]
    print(f"  server resident memory: {before:.0f} MiB before the overload, peak {peak:.0f} MiB "
          f"during it, {after:.0f} MiB 1 s after")
    print(f"  health Check under overload (from a process of its own): max "
          f"{max(served['health']) * 1e3:.1f} ms, p99 {pct(served['health'], 0.99) * 1e3:.1f} ms over "
          f"{len(served['health'])} checks, {served['health_failed']} failed")
    print(f"streams: {streams['answered']}/{streams['streams']} streams answered both requests; "
          f"slowest first answer {streams['slowest_first_s']:.2f} s, all done in {streams['all_s']:.2f} s; "
          f"health Check max {streams['health_max_s'] * 1e3:.1f} ms over {streams['health_checks']} checks, "
          f"{streams['health_failed']} failed")  # fmt: skip
    if streams["failed"]:
        print(f"  streams that failed: {streams['failed']}")


def main() -> int:
    args = parse_args()
    if args.client_slice_us:
        from visionserve.server.sched_slice import shorten_front_end

        taken = shorten_front_end(args.client_slice_us * 1000)
        print(f"the bench's threads on a {args.client_slice_us} us scheduler slice: "
              f"{'yes' if taken else 'no (the kernel keeps no slice of a normal thread)'}")
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    with tempfile.TemporaryDirectory() as tmp:
        repository, model, images = workload(args, Path(tmp))
        from visionserve.server.repository import ModelRepository

        task = ModelRepository(repository).entry(model).config.task
        print(f"model {model} ({task}), {len(images)} images of mean "
              f"{np.mean([len(i) for i in images]) / 1024:.0f} KiB")  # fmt: skip
        bare = Bare(repository, model, images)
        requests = [request_bytes(model, task, data)[1] for data in images]
        floor = [request_bytes("no-such-model", task, data)[1] for data in images]
        method = request_bytes(model, task, images[0])[0]
        process, port = start_server(repository, *args.server_arg)
        try:
            address = f"127.0.0.1:{port}"
            served = asyncio.run(served_figures(address, method, requests, floor, bare, args, process.pid))
            served["batch"] = bare.batch
        finally:
            process.terminate()
            process.wait(60)
        process, port = start_server(tiny_repository(Path(tmp) / "streams"))
        try:
            streams = asyncio.run(streams_figures(f"127.0.0.1:{port}", args.streams))
        finally:
            process.terminate()
            process.wait(60)
    if args.server_arg:
        print(f"server arguments: {' '.join(args.server_arg)}")
    report(served, streams, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
