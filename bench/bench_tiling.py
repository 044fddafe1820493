"""Tiled segmentation of large images: served tiles/s vs the bare backend at the tile shape.

Bare: the model's backend called directly on batches of preprocessed tiles (the tile
shape the server uses), at its best batch size, in tiles/s. Served: a ``visionserve
serve`` subprocess segmenting ``--count`` images of each ``--sizes`` side (Segment
calls from ``--clients`` threads, raw RGB, masks returned as PNG), in images/s and
tiles/s; the ratio served / bare tiles/s (goal >= 0.85), and the server's peak RSS
(VmHWM) after each size. ``--huge`` then sends one image of that side (default
10,000 x 10,000) and prints the server's peak RSS after it (tiles go through in waves,
so memory stays bounded). Placement as in ``bench_segment_cli.py``: ``split`` runs the
server and bare on the first half of the CPUs and the client on the rest. A figure,
not a pass/fail test.

    python bench/bench_tiling.py                      # the zoo UNet (random weights)
    python bench/bench_tiling.py --base-channels 16 --sizes 2048 4096 --huge 10000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pinning import on_cpus  # noqa: E402 - the bench folder is not a package
from _proc import status_mib  # noqa: E402
from bench_segment_cli import _run_bare, free_port, placements, process_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-channels", type=int, default=8, help="zoo UNet width (default 8)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="image sides")
    parser.add_argument("--count", type=int, default=4, help="images per size (default 4)")
    parser.add_argument("--clients", type=int, default=2, help="client threads (default 2)")
    parser.add_argument("--huge", type=int, default=10_000, help="side of the one huge image (0: none)")
    parser.add_argument("--seconds", type=float, default=5.0, help="bare measurement time per batch size")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: the server's default)")
    parser.add_argument("--placement", choices=("split", "shared"), default="split")
    parser.add_argument("--max-batch-size", type=int, default=4)
    return parser.parse_args(argv)


def write_repository(repo: Path, base_channels: int, max_batch: int) -> str:
    """The zoo UNet (depth 3, random weights), pad mode, its receptive field recorded."""
    sys.path.insert(0, str(ROOT / "tests/models"))
    import make_models
    from visionserve.export.receptive_field import receptive_field
    from visionserve.server.model_config import InputSpec, ShapeProfile

    proto = make_models.zoo_segmenter_onnx("unet", base_channels=base_channels)
    spec = InputSpec(name="image", mean=make_models.MEAN, std=make_models.STD, mode="pad",
                     receptive_field=receptive_field(proto))
    profile = ShapeProfile(batch=(1, max_batch, 32), height=(32, 256, 512), width=(32, 256, 512))
    make_models.write_entry(repo, "unet", "segmentation", model=proto, input=spec,
                            profile=profile, max_batch_size=max_batch)
    return "unet"


def bare_tiles_per_s(repo: Path, model: str, args: argparse.Namespace) -> tuple[float, int]:
    """Best tiles/s of backend.infer on batches of tiles, and the batch size it took."""
    from visionserve.server.repository import ModelRepository
    from visionserve.server.backends.registry import auto_threads, load_backend
    from visionserve.server.preprocess import preprocess_batch
    from visionserve.server.tiling import tile_size

    entry = ModelRepository(repo).entry(model)
    spec = entry.config.input
    side = tile_size(spec)
    tile = np.random.default_rng(2).integers(0, 256, (side, side, 3), dtype=np.uint8)
    backend = load_backend(entry, args.threads or auto_threads(1))
    try:
        best = (0.0, 1)
        for batch in sorted({1, 2, entry.config.max_batch_size}):
            feeds = {spec.name: preprocess_batch([tile] * batch, spec)}
            rate, _ = _run_bare(backend, feeds, 1, args.seconds)
            best = max(best, (rate, batch))
        return best
    finally:
        backend.close()


def peak_rss_mib(pid: int) -> float:
    return status_mib(pid, "VmHWM")


def image_of(side: int, seed: int, block: int = 16) -> bytes:
    """A PNG of coloured ``block``-pixel squares: varied for the model, cheap to make."""
    import cv2

    rng = np.random.default_rng(seed)
    n = side // block + 1
    blocks = rng.integers(0, 256, (n, n, 3), dtype=np.uint8)
    image = cv2.resize(blocks, (n * block, n * block), interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image[:side, :side]))
    assert ok
    return png.tobytes()


def start_server(repo: Path, threads: int) -> tuple[subprocess.Popen, int]:
    """A ``visionserve serve`` subprocess on a free port (10^8-pixel images allowed)."""
    port = free_port()
    command = [sys.executable, "-m", "visionserve.cli", "--log-level", "WARNING", "serve",
               "--repository", str(repo), "--port", str(port), "--intra-op-threads", str(threads),
               "--max-pixels", "120000000", "--max-message-mb", "512"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE)
    if b"serving on" not in server.stdout.readline():
        server.kill()
        raise RuntimeError("the server did not start")
    return server, port


def served(port: int, model: str, images: list[bytes], clients: int) -> tuple[float, int]:
    """(images/s, tiles per image) of Segment calls from ``clients`` threads."""
    from visionserve.clients import VisionClient

    tiles: list[int] = []
    pending = list(range(len(images)))
    lock = threading.Lock()

    def work() -> None:
        with VisionClient(f"127.0.0.1:{port}", timeout=600, max_message_mb=512) as client:
            while True:
                with lock:
                    if not pending:
                        return
                    i = pending.pop()
                result = client.segment(images[i], model=model)
                tiles.append(result.serving.tiles)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(images) / (time.perf_counter() - t0), max(tiles)


def main(argv: list[str] | None = None) -> None:
    from visionserve.server.backends.registry import auto_threads

    args = parse_args(argv)
    placement = next(p for p in placements(args.placement))
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        model = write_repository(repo, args.base_channels, args.max_batch_size)
        with on_cpus(os.getpid(), placement.server):
            bare, batch = bare_tiles_per_s(repo, model, args)
        print(f"placement {placement.name}: server CPUs {sorted(placement.server)}, "
              f"client CPUs {sorted(placement.client)}; other work may share the cores")
        print(f"bare backend: {bare:.2f} tiles/s at batch {batch} (512x512 tiles)")
        with on_cpus(os.getpid(), placement.server):
            server, port = start_server(repo, args.threads or auto_threads(1))
        try:
            with on_cpus(os.getpid(), placement.client):
                for side in args.sizes:
                    images = [image_of(side, i) for i in range(args.count)]
                    cpu0 = process_cpu_seconds(server.pid)
                    rate, tiles = served(port, model, images, args.clients)
                    cpu = (process_cpu_seconds(server.pid) - cpu0) / len(images)
                    print(f"{side}x{side}: {rate:.3f} images/s, {rate * tiles:.2f} tiles/s "
                          f"({tiles} tiles/image), served/bare {rate * tiles / bare:.2f}, "
                          f"server CPU {cpu:.2f} s/image, server peak RSS {peak_rss_mib(server.pid):.0f} MiB")
                if args.huge:
                    huge = image_of(args.huge, 99, block=64)
                    t0 = time.perf_counter()
                    _, tiles = served(port, model, [huge], 1)
                    print(f"{args.huge}x{args.huge}: {tiles} tiles in {time.perf_counter() - t0:.1f} s, "
                          f"server peak RSS {peak_rss_mib(server.pid):.0f} MiB (the decoded image "
                          f"alone is {args.huge**2 * 3 / 2**20:.0f} MiB, its mask {args.huge**2 / 2**20:.0f} MiB)")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
