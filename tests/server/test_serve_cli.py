"""``visionserve serve`` as a real process: port 0, SERVING, SIGTERM -> exit 0; its
``--help`` and README's settings table, checked against the declared settings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import cv2
import grpc
import make_models
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_test_helpers import read_port
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.settings import SETTINGS, ServerSettings
from visionserve.server.settings_spec import Declared

from visionserve.commands._settings_cli import settings_table

SERVE = [sys.executable, "-m", "visionserve.cli", "serve"]
README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_START = "<!-- settings table: generated from server/settings.py"
TABLE_END = "<!-- end of the settings table -->"


def _start_serve(model_repository: Path) -> subprocess.Popen:
    """``visionserve serve`` on a free port, 2 workers, 1 ONNX Runtime thread, 1 s grace."""
    env = {**os.environ, "VISIONSERVE_WORKERS": "2", "VISIONSERVE_INTRA_OP_THREADS": "1"}
    return subprocess.Popen(
        [*SERVE, "--repository", str(model_repository), "--port", "0", "--grace", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_serve_subprocess_serves_and_stops_on_sigterm(model_repository: Path) -> None:
    process = _start_serve(model_repository)
    try:
        port = read_port(process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            ok, png = cv2.imencode(".png", np.full((8, 8, 3), (0, 200, 0), np.uint8))
            reply = pb_grpc.VisionServiceStub(channel).Classify(
                pb.ClassifyRequest(
                    model=make_models.CLASSIFIER, image=pb.Image(encoded=png.tobytes())
                ),
                timeout=10,
            )
            assert reply.top[0].label == "green"
        if sys.platform.startswith("linux"):  # default --inference-nice 10: see test_priority
            base = os.getpriority(os.PRIO_PROCESS, process.pid)
            nices = [os.getpriority(os.PRIO_PROCESS, int(t))
                     for t in os.listdir(f"/proc/{process.pid}/task")]  # fmt: skip
            assert set(nices) == {base, min(base + 10, 19)}, nices
            assert nices.count(min(base + 10, 19)) >= 2, nices  # each model's batcher
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _signal_a_thread_other_than_main(pid: int, signum: int) -> int:
    """``kill`` one of ``pid``'s threads but the main one, by thread id (the oldest still
    alive: gRPC's may come and go); returns that id, 0 if none was found."""
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid):
        try:
            os.kill(tid, signum)
        except ProcessLookupError:
            continue
        return tid
    return 0


def test_serve_acts_on_a_sigterm_caught_by_another_thread(model_repository: Path) -> None:
    """``kill`` naming a thread's id hands the signal to that thread (as the kernel may do
    with any process-directed signal): the C handler runs there, and the main thread must
    still wake up and drain. With a main thread blocked in ``Event.wait()`` it never did."""
    process = _start_serve(model_repository)
    try:
        read_port(process)
        assert _signal_a_thread_other_than_main(process.pid, signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


_FROZEN_SCRIPT = """
import gc, os, signal, sys
from pathlib import Path
from visionserve.server.app import serve
from visionserve.server.settings import ServerSettings

def ready(host, port):
    print("frozen", gc.get_freeze_count(), "young", len(gc.get_objects()), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

sys.exit(serve(ServerSettings(repository=Path(sys.argv[1]), port=0, workers=2,
                              intra_op_threads=1, grace_period_s=1), on_ready=ready))
"""


def test_serve_puts_what_start_up_made_out_of_the_collectors_sight(model_repository: Path) -> None:
    """``gc.freeze()`` once serving: a full collection under load scans what requests
    made, not the tens of thousands of start-up objects (a 16-60 ms pause of the event
    loop each time, measured under a 2x flood)."""
    done = subprocess.run(
        [sys.executable, "-c", _FROZEN_SCRIPT, str(model_repository)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    frozen, young = map(int, re.search(r"frozen (\d+) young (\d+)", done.stdout).groups())
    assert frozen > 10_000 and young < frozen / 10, (frozen, young)


def test_serve_without_a_repository_exits_2_and_says_why(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VISIONSERVE_REPOSITORY"}
    result = subprocess.run(
        [*SERVE, "--repository", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "repository must be an existing directory" in result.stderr


def test_the_serving_path_never_imports_torch() -> None:
    code = (
        "import sys, visionserve.server.app, visionserve.commands.serve;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.fixture(scope="module")
def option_helps() -> dict[str, str]:
    """``visionserve serve --help``: each option's help text (joined), by flag."""
    env = {**os.environ, "COLUMNS": "1000"}  # one line per help text
    text = subprocess.run(
        [*SERVE, "--help"], capture_output=True, text=True, env=env, timeout=60, check=True
    ).stdout
    helps: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        option = re.match(r"^  (--[a-z-]+)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if option:
            flag = option.group(1)
            helps[flag] = option.group(2) or ""
        elif flag and line.startswith(" " * 8) and line.strip():
            helps[flag] = f"{helps[flag]} {line.strip()}".strip()
        else:
            flag = None
    return helps


def expected_default(declared: Declared) -> str:
    """The default as --help must show it, from the dataclass's own default."""
    default = {f.name: f.default for f in fields(ServerSettings)}[declared.name]
    if default is MISSING:
        return "(required;"
    if default is None or default == ():
        return f"(default: {declared.spec.unset};"
    if isinstance(default, bool):
        return f"(default: {declared.name} {'on' if default else 'off'};"
    if declared.spec.scale != 1:  # shown in the option's unit (--max-message-mb: MiB)
        default /= declared.spec.scale
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"(default: {default};"


@pytest.mark.parametrize("declared", [pytest.param(d, id=d.flag) for d in SETTINGS])
def test_help_shows_each_default_and_variable(option_helps, declared: Declared) -> None:
    text = option_helps[declared.flag]
    assert expected_default(declared) in text, text
    assert declared.spec.help in text
    assert (f"env {declared.env}" if declared.env else "no environment variable") in text


def test_help_shows_the_defaults_of_old(option_helps) -> None:
    """Spot checks written out by hand, in the option's units."""
    assert "(default: 64;" in option_helps["--max-message-mb"]
    assert "(default: 10;" in option_helps["--grace"]
    assert "(default: 8001; env VISIONSERVE_PORT; then PORT)" in option_helps["--port"]
    assert "(default: 40000000;" in option_helps["--max-pixels"]
    assert "--log-format" in option_helps


def test_readme_table_lists_every_setting() -> None:
    """README's table is generated: VISIONSERVE_ACCEPT=1 rewrites it (then review the diff)."""
    readme = README.read_text(encoding="utf-8")
    assert TABLE_START in readme and TABLE_END in readme, "README's '## Serving' holds the table"
    head, rest = readme.split(TABLE_START, 1)
    comment, rest = rest.split("-->\n", 1)
    table, tail = rest.split(TABLE_END, 1)
    expected = f"\n{settings_table()}\n"  # blank lines around: Markdown sees a table
    if os.environ.get("VISIONSERVE_ACCEPT") == "1" and table != expected:
        README.write_text(f"{head}{TABLE_START}{comment}-->\n{expected}{TABLE_END}{tail}")
        table = expected
    for declared in SETTINGS:
        assert f"| `{declared.flag}` |" in table, declared.flag
        assert not declared.env or f"`{declared.env}`" in table, declared.env
    assert table == expected, (
        "README's settings table is stale: VISIONSERVE_ACCEPT=1 .venv/bin/pytest "
        "tests/server/test_serve_cli.py -k readme rewrites it"
    )
