"""Shared by the deploy tests: the manifests on disk, rendered overlays, and the metric
names a live server exposes (what dashboards and autoscaling rules may refer to)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "server"))
from server_test_helpers import scrape

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.37.0"  # the newest kubernetes-validate knows (constraints.txt)
# apiVersion groups validated against Kubernetes' own schemas (everything else is a CRD
# or a kustomize file, checked otherwise)
CORE_GROUPS = {"", "apps", "policy", "autoscaling", "batch"}
METRIC_NAME = re.compile(r"\bvisionserve_[a-z_]+\b")


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), ROOT / "docker-compose.yml"])


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def group(document: dict[str, Any]) -> str:
    api = document.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def is_core(document: dict[str, Any]) -> bool:
    return "kind" in document and group(document) in CORE_GROUPS


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR`` (kustomize is built into kubectl) as documents."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        import pytest

        pytest.skip("kubectl (with its built-in kustomize) is not installed: overlays not rendered")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def exposed_names(text: str) -> set[str]:
    """Every sample name in a Prometheus exposition (``_bucket``/``_sum``/``_total``...)."""
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line and line[0] != "#"}


def promql_metric_names(text: str) -> Iterator[str]:
    yield from METRIC_NAME.findall(text)


def live_metric_names(start_server: Callable[..., Any]) -> set[str]:
    """The sample names of a real server after a request per task and a failed one
    (a labelled counter shows no sample until it has a child)."""
    import make_models
    import numpy as np
    from visionserve.clients import VisionClient, VisionServeError

    server = start_server(metrics_port=0)
    image = np.zeros((16, 16, 3), np.uint8)
    with VisionClient(f"127.0.0.1:{server.port}", timeout=10) as client:
        client.classify(image, model=make_models.CLASSIFIER)
        client.segment(image, model=make_models.SEGMENTER)
        try:
            client.segment(image, model="no-such-model")
        except VisionServeError:
            pass
    return exposed_names(scrape(server.metrics_port))
