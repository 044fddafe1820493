"""No cluster runs in CI: the Kubernetes and KServe manifests are rendered (kustomize),
validated against the schemas of Kubernetes (kubernetes-validate, strict) and of the
KServe fields they use (deploy/kserve/kserve-v1beta1.schema.json), and cross-checked
against the code: every environment variable is a server setting the server accepts, the
probes hit the gRPC port, the drain fits the grace period, and the autoscaling rule reads
metrics a live server exposes."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    K8S,
    KUBERNETES_VERSION,
    by_kind,
    documents,
    env_of,
    is_core,
    kustomize,
    live_metric_names,
    promql_metric_names,
    yaml_files,
)
from visionserve.server.settings import ENV_VARS, PLATFORM_ENV_VARS, load_settings

from visionserve.cli import build_parser

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate is not installed (scripts/test.sh installs it)",
)
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")

OVERLAYS = ["overlays/cpu", "overlays/gpu", "monitoring"]
KSERVE = DEPLOY / "kserve"


def validate_core(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(K8S / name) for name in OVERLAYS}


def test_every_manifest_parses() -> None:
    for path in yaml_files():
        assert documents(path), f"{path} holds no YAML document"
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_core_documents_validate_strictly(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    core = [d for d in docs if is_core(d)]
    for document in core:
        validate_core(document)
    kinds = {d["kind"] for d in core}
    if overlay.startswith("overlays"):
        expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
        assert expected | {"PersistentVolumeClaim"} == kinds


def test_strict_validation_catches_a_typo(rendered) -> None:
    deployment = copy.deepcopy(by_kind(rendered["overlays/cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(deployment)


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_deployment_probes_drain_and_settings(rendered, overlay: str, tmp_path: Path) -> None:
    docs = rendered[overlay]
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    env = env_of(container)
    assert set(env) <= set(ENV_VARS.values()), "every variable is a server setting"
    settings = load_settings({}, environ={**env, "VISIONSERVE_REPOSITORY": str(tmp_path)})
    assert (settings.host, settings.port) == ("0.0.0.0", 8001)
    args = build_parser(["serve"]).parse_args(container["args"])
    assert args.command == "serve"
    grpc_port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert grpc_port == {"grpc": settings.port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": settings.port}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load + warm up"
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > settings.grace_period_s
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.grace_period_s
    annotations = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[env["VISIONSERVE_REPOSITORY"]] == "models"
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    claim = by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim


def test_gpu_overlay_asks_for_one_gpu_and_the_gpu_backends(rendered, tmp_path: Path) -> None:
    container = server_container(rendered["overlays/gpu"])
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == 1
    env = {**env_of(container), "VISIONSERVE_REPOSITORY": str(tmp_path)}
    assert load_settings({}, environ=env).backends == ("tensorrt", "onnxruntime-cuda")
    cpu = env_of(server_container(rendered["overlays/cpu"]))
    assert load_settings({}, environ={**cpu, "VISIONSERVE_REPOSITORY": str(tmp_path)}).backends == (
        "onnxruntime-cpu",
    )


def test_service_speaks_http2_and_selects_the_pods(rendered) -> None:
    docs = rendered["overlays/cpu"]
    service = by_kind(docs, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["metrics"]["targetPort"] == "metrics"
    labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector and selector.items() <= labels.items()


def test_hpa_targets_the_adapter_metric_the_server_exposes(rendered, start_server) -> None:
    hpa = by_kind(rendered["overlays/cpu"], "HorizontalPodAutoscaler")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == by_kind(rendered["overlays/cpu"], "Deployment")["metadata"]["name"]
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    values = yaml.safe_load((K8S / "monitoring/prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    referenced = set(promql_metric_names(rule["metricsQuery"] + rule["seriesQuery"]))
    assert referenced == {"visionserve_queue_seconds_sum", "visionserve_queue_seconds_count"}
    assert referenced <= live_metric_names(start_server)


def test_servicemonitor_scrapes_the_metrics_port(rendered) -> None:
    monitor = by_kind(rendered["monitoring"], "ServiceMonitor")
    service = by_kind(rendered["overlays/cpu"], "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_models_from_image_component_renders(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays/cpu", overlay)],
                "components": [os.path.relpath(K8S / "components/models-from-image", overlay)],
            }
        )
    )
    docs = kustomize(overlay)
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    for document in docs:
        validate_core(document)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert volume == {"name": "models", "emptyDir": {}}
    assert [m["name"] for m in init["volumeMounts"]] == ["models"]


# -- KServe -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kserve_schema() -> dict[str, Any]:
    return json.loads((KSERVE / "kserve-v1beta1.schema.json").read_text())


@pytest.fixture(scope="module")
def kserve_docs() -> dict[str, dict[str, Any]]:
    docs = [d for path in sorted(KSERVE.glob("*.yaml")) for d in documents(path)]
    return {d["kind"]: d for d in docs}


def test_kserve_resources_match_the_schema(kserve_schema, kserve_docs) -> None:
    assert set(kserve_docs) == {"ClusterServingRuntime", "InferenceService"}
    jsonschema.Draft202012Validator.check_schema(kserve_schema)
    for document in kserve_docs.values():
        jsonschema.validate(document, kserve_schema)
    # containers and resources are core types: validated as a Pod's
    runtime = kserve_docs["ClusterServingRuntime"]["spec"]
    model = kserve_docs["InferenceService"]["spec"]["predictor"]["model"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {
            "containers": [
                *runtime["containers"],
                {"name": "m", "image": "x", "resources": model["resources"]},
            ]
        },
    }
    validate_core(pod)


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "predictor", "model", "storageUrl"), "s3://x"),  # a typo
        (("spec", "predictor", "model", "protocolVersion"), "grpc"),
        (("spec", "predictor", "model", "storageUri"), "/local/path"),
    ],
)
def test_kserve_schema_rejects_what_kserve_would(kserve_schema, kserve_docs, path, value) -> None:
    document = copy.deepcopy(kserve_docs["InferenceService"])
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, kserve_schema)


def test_kserve_runtime_fits_the_server(kserve_docs, tmp_path: Path) -> None:
    runtime = kserve_docs["ClusterServingRuntime"]["spec"]
    service = kserve_docs["InferenceService"]["spec"]["predictor"]["model"]
    assert runtime["protocolVersions"] == ["grpc-v2"] == [service["protocolVersion"]]
    assert service["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    assert service["runtime"] == kserve_docs["ClusterServingRuntime"]["metadata"]["name"]
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container"
    (port,) = container["ports"]
    assert port["name"] == "h2c"
    env = env_of(container)
    assert set(env) <= set(ENV_VARS.values()) | set(PLATFORM_ENV_VARS.values())
    assert env["STORAGE_URI"] == "/mnt/models"  # what KServe rewrites it to anyway
    # as the pod sees it: Knative sets PORT to the container port
    knative = {**env, "STORAGE_URI": str(tmp_path), "PORT": str(port["containerPort"])}
    settings = load_settings({}, environ=knative)
    assert (settings.repository, settings.host) == (tmp_path, "0.0.0.0")
    assert container["readinessProbe"]["grpc"]["port"] == settings.port == port["containerPort"]
    assert runtime["annotations"]["prometheus.kserve.io/port"] == str(settings.metrics_port)
    build_parser(["serve"]).parse_args(container["args"])


def test_kserve_pod_reaches_serving_with_that_environment(kserve_docs, model_repository) -> None:
    """The runtime's environment, as KServe completes it, starts a real server."""
    import socket

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from visionserve.server.app import create_server

    env = env_of(kserve_docs["ClusterServingRuntime"]["spec"]["containers"][0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    environ = {
        **env,
        "STORAGE_URI": str(model_repository),
        "PORT": str(free),
        "VISIONSERVE_METRICS_PORT": "0",
    }
    server, port = create_server(load_settings({"host": "127.0.0.1"}, environ=environ))
    try:
        assert port == free
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None).wait()
        server.close()
