"""The benchmark scripts import and parse their options (they are run by hand, not in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", ["served_vs_bare.py", "bench_segment_cli.py"])
def test_bench_script_starts_and_documents_its_options(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--repository" in done.stdout and "--model" in done.stdout


ROOT = BENCH.parent


def test_gpu_check_parses_its_options() -> None:
    script = ROOT / "scripts" / "gpu-check.sh"
    done = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "VISIONSERVE_REQUIRE_GPU=1" in done.stdout
    for bad, message in ((["--bogus"], "unknown argument --bogus"),
                         (["--budget", "soon"], "--budget must be whole seconds")):
        done = subprocess.run(["bash", str(script), *bad], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr
    for args in (["models", "--help"], ["figures", "--help"]):
        done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "--out" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "figures", "--out", "x",
                           "--iters", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--iters must be at least 1" in done.stderr


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    """scripts/gpu-check.sh --cpu: the GPU call's steps with the CPU provider, small models
    (5 min on 2 shared cores; ~1 min alone), so the one GPU call runs code that already ran."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--cpu", "--out",
                           str(tmp_path / "out"), "--budget", "1500"],
                          capture_output=True, text=True, timeout=1600, env=env)
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert done.returncode == 0, log[-4000:]
    assert "FAILED" not in log
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert figures["resnet50_speed"]["backend_fp16"] == "onnxruntime-cpu on cpu, fp16"
    assert figures["unet_agreement"]["fp16_vs_fp32_on_cpu"]["mask_agreement"] > 0.9
    assert set(figures["unet_shapes"]) == {"shapes", "HEURISTIC", "EXHAUSTIVE"}
    assert "served backend: onnxruntime-cpu on cpu, fp32" in log


def test_tiling_bench_starts_and_documents_its_options() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_tiling.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--sizes" in done.stdout and "--huge" in done.stdout


def test_grpc_pause_bench_prints_a_round_trip_per_pause() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "grpc_pause.py"), "--pauses-ms", "0", "5",
         "--calls", "20", "--request-bytes", "1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "pause" in line]
    assert [line.split(":")[0].split()[-2] for line in lines] == ["0.0", "5.0"], done.stdout
    for line in lines:
        grpc_ms, tcp_ms = (float(part.split()[-2]) for part in line.split(":")[1].split(","))
        assert grpc_ms > 0 and tcp_ms > 0, line


def test_overload_bench_probes_health_from_a_process_of_its_own(start_server, monkeypatch) -> None:
    """bench/overload.py's HealthProbe (bench/_watch.py): a child process Checks a real
    server every 100 ms until told to stop; checks after the server has gone count as failed."""
    import time

    monkeypatch.syspath_prepend(str(BENCH))
    import _watch
    server = start_server()
    with _watch.HealthProbe(f"127.0.0.1:{server.port}") as probe:
        assert probe.process.pid != os.getpid()
        time.sleep(0.6)
    assert len(probe.seconds) >= 3 and probe.failed == 0, (probe.seconds, probe.failed)
    assert all(0 < s < 5 for s in probe.seconds)
    server = start_server()
    with _watch.HealthProbe(f"127.0.0.1:{server.port}") as probe:
        server.stop(None).wait()
        time.sleep(0.6)
    assert probe.failed >= 1, (probe.seconds, probe.failed)
