"""No Docker engine runs in CI: check that the compose file and Dockerfile agree with
each other and with the code (targets exist, copied paths exist, commands parse), and
that the Prometheus configuration (promtool when installed) and the Grafana dashboard
refer to what the server exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, live_metric_names, promql_metric_names
from visionserve.server.settings import load_settings

from visionserve.cli import COMMANDS, build_parser

SERVERS = ("server", "server-gpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_targets(path: Path) -> set[str]:
    return set(
        re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.MULTILINE | re.IGNORECASE)
    )


def test_compose_services_build_existing_targets(compose: dict) -> None:
    assert set(compose["services"]) == {"export", *SERVERS, "prometheus", "grafana"}
    for name, service in compose["services"].items():
        if "build" not in service:
            assert re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", service["image"]), "a pinned image tag"
            continue
        build = service["build"]
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        assert build["target"] in dockerfile_targets(dockerfile), (
            f"{name}: no stage {build['target']}"
        )


def test_dockerfile_copies_paths_that_exist() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE):
        if line.startswith("--from="):
            continue  # from another stage
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


@pytest.mark.parametrize("service", ["export", *SERVERS])
def test_compose_commands_parse(compose: dict, service: str) -> None:
    argv = compose["services"][service]["command"]
    assert argv[0] in COMMANDS
    args = build_parser(argv).parse_args(argv)  # raises SystemExit on a bad option
    assert args.command == argv[0]


@pytest.mark.parametrize("name", SERVERS)
def test_server_waits_for_export_and_reads_its_volume(compose: dict, name: str) -> None:
    server, export = compose["services"][name], compose["services"]["export"]
    assert server["depends_on"]["export"]["condition"] == "service_completed_successfully"
    export_volume = export["volumes"][0].split(":")[0]
    assert any(v.split(":")[0] == export_volume for v in server["volumes"])
    repo = server["command"][server["command"].index("--repository") + 1]
    workdir = export["command"][export["command"].index("--workdir") + 1]
    assert repo == f"{workdir}/models"  # demo --export-only writes WORKDIR/models


def server_settings(service: dict, tmp_path) -> object:
    """The compose service's command and environment, as the server would read them."""
    argv = service["command"]
    from visionserve.commands._settings_cli import overrides as from_options

    overrides = from_options(build_parser(argv).parse_args(argv))
    overrides["repository"] = tmp_path
    return load_settings(overrides, environ=service.get("environment", {}))


def test_gpu_profile_reserves_a_gpu_for_the_gpu_backends(compose: dict, tmp_path) -> None:
    gpu = compose["services"]["server-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in compose["services"]["server"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert server_settings(gpu, tmp_path).backends == ("tensorrt", "onnxruntime-cuda")
    published = [p.split(":")[0] for s in SERVERS for p in compose["services"][s]["ports"]]
    assert len(published) == len(set(published)), "both profiles can run side by side"


def test_prometheus_scrapes_each_server_metrics_port(compose: dict, tmp_path) -> None:
    mounts = dict(
        v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./")
    )
    config_path = ROOT / next(src for src, dst in mounts.items() if dst.endswith("prometheus.yml"))
    config = yaml.safe_load(config_path.read_text())
    targets = {
        t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    expected = {
        f"{s}:{server_settings(compose['services'][s], tmp_path).metrics_port}" for s in SERVERS
    }
    assert targets == expected
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus): config only parsed")
    out = subprocess.run(
        [promtool, "check", "config", str(config_path)], check=False, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_and_dashboard_use_exposed_metrics(
    compose: dict, start_server
) -> None:
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    for source in mounts:
        assert (ROOT / source).exists(), source
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/visionserve.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/visionserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    referenced = {name for expr in exprs for name in promql_metric_names(expr)}
    missing = referenced - live_metric_names(start_server)
    assert not missing, f"the dashboard refers to metrics the server does not expose: {missing}"


def test_dockerfile_commands_parse() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    commands = [json.loads(argv) for argv in re.findall(r"^CMD\s+(\[.*\])$", text, re.MULTILINE)]
    assert len(commands) == len(dockerfile_targets(ROOT / "deploy/Dockerfile")) - 1  # not base
    for argv in commands:
        assert build_parser(argv).parse_args(argv).command == argv[0]
