"""No Docker engine runs in CI: check that the compose file and Dockerfile agree with
each other and with the code (targets exist, copied paths exist, commands parse)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from visionserve.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_targets(path: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.MULTILINE | re.IGNORECASE))


def test_compose_services_build_existing_targets(compose: dict) -> None:
    assert set(compose["services"]) == {"export", "server"}
    for name, service in compose["services"].items():
        build = service["build"]
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        assert build["target"] in dockerfile_targets(dockerfile), f"{name}: no stage {build['target']}"


def test_dockerfile_copies_paths_that_exist() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


@pytest.mark.parametrize("service", ["export", "server"])
def test_compose_commands_parse(compose: dict, service: str) -> None:
    argv = compose["services"][service]["command"]
    assert argv[0] in COMMANDS
    args = build_parser(argv).parse_args(argv)  # raises SystemExit on a bad option
    assert args.command == argv[0]


def test_server_waits_for_export_and_reads_its_volume(compose: dict) -> None:
    server, export = compose["services"]["server"], compose["services"]["export"]
    assert server["depends_on"]["export"]["condition"] == "service_completed_successfully"
    export_volume = export["volumes"][0].split(":")[0]
    assert any(v.split(":")[0] == export_volume for v in server["volumes"])
    repo = server["command"][server["command"].index("--repository") + 1]
    workdir = export["command"][export["command"].index("--workdir") + 1]
    assert repo == f"{workdir}/models"  # demo --export-only writes WORKDIR/models
