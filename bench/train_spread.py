"""Training spread: the demo segmenter trained for every seed x torch-thread count, one table.

    python bench/train_spread.py --data DIR --val DIR [--seeds 0,1,2] [--threads 1,2] [-- TRAIN OPTIONS]

Each run is a real ``visionserve train --task segmentation`` subprocess, one after the
other (never in parallel: they would share the cores). Torch thread counts change the
order of float additions, so trajectories differ as they would on another CPU. Per run:
held-out per-class IoU and mIoU (dataset-level, ``server/iou.py``), wall time and CPU
time (user + sys of the training process: on a busy machine wall time grows, CPU time
much less, so a quiet-machine time can be inferred). Options after ``--`` go to
``visionserve train`` (e.g. ``-- --epochs 6 --loss ce``). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="training data set (visionserve generate)")
    parser.add_argument("--val", type=Path, required=True, help="held-out data set")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--threads", type=_ints, default=[1, 2],
                        help="comma-separated torch thread counts (default: 1,2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv), extra


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_once(data: Path, val: Path, seed: int, threads: int, extra: list[str], out: Path) -> dict:
    """One training subprocess; returns its held-out metrics, wall and CPU seconds."""
    command = [sys.executable, "-m", "visionserve.cli", "train", "--task", "segmentation",
               "--data", str(data), "--val", str(val), "--out", str(out), "--seed", str(seed),
               "--threads", str(threads), "--min-class-iou", "0", *extra]
    cpu, wall = _cpu_seconds(), time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(command, check=True, env=env)  # its per-epoch lines show progress
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    metrics = json.loads((out / "model.json").read_text())["metrics"]
    return {"seed": seed, "threads": threads, "miou": metrics["miou"], "iou": metrics["iou"],
            "wall_s": wall, "cpu_s": cpu, "train_s": metrics["train_seconds"],
            "config": metrics["config"]}


def table(rows: list[dict]) -> str:
    names = list(rows[0]["iou"])
    header = ["seed", "threads", *names, "mIoU", "wall s", "CPU s"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        cells = [str(row["seed"]), str(row["threads"]), *(f"{row['iou'][n]:.3f}" for n in names),
                 f"{row['miou']:.3f}", f"{row['wall_s']:.0f}", f"{row['cpu_s']:.0f}"]
        lines.append(" | ".join(cells))
    worst = {n: min(r["iou"][n] for r in rows) for n in names}
    lines.append(" | ".join(["min", "", *(f"{worst[n]:.3f}" for n in names),
                             f"{min(r['miou'] for r in rows):.3f}", "", ""]))
    return "\n".join(lines)


def main() -> int:
    args, extra = parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for threads in args.threads:
                row = train_once(args.data, args.val, seed, threads, extra, Path(tmp) / f"s{seed}t{threads}")
                print(f"seed {seed} threads {threads}: mIoU {row['miou']:.4f} "
                      + " ".join(f"{k} {v:.3f}" for k, v in row["iou"].items())
                      + f"  wall {row['wall_s']:.0f} s CPU {row['cpu_s']:.0f} s", flush=True)
                rows.append(row)
    print(f"\nconfig: {json.dumps(rows[0]['config'])}\n")
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
