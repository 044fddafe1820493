"""ServerSettings validation and the environment / override precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
from visionserve.server.settings import MIB, ServerSettings, load_settings


def test_defaults_and_address(tmp_path: Path) -> None:
    settings = ServerSettings(repository=tmp_path)
    assert settings.address == "127.0.0.1:8001"
    assert settings.max_message_bytes == 64 * MIB
    assert ServerSettings(repository=tmp_path, host="::1", port=0).address == "[::1]:0"


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("port", 70000, "port must be in 0..65535"),
        ("workers", -1, "workers, max_admitted and admission_wait_ms must be >= 0"),
        ("max_streams", 0, "max_streams must be at least 1"),
        ("max_decoded_pixels", 0, "max_decoded_pixels must be at least 1"),
        ("grace_period_s", -1.0, "grace_period_s must be >= 0"),
        ("host", "", "host must not be empty"),
    ],
)
def test_invalid_values_say_what_is_expected(
    tmp_path: Path, field: str, value: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ServerSettings(repository=tmp_path, **{field: value})


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="existing directory"):
        ServerSettings(repository=tmp_path / "nope")


def test_environment_then_overrides(tmp_path: Path) -> None:
    env = {
        "VISIONSERVE_REPOSITORY": str(tmp_path),
        "VISIONSERVE_PORT": "9000",
        "VISIONSERVE_WORKERS": "3",
    }
    settings = load_settings({"port": 0, "workers": None}, environ=env)
    assert settings.repository == tmp_path and settings.port == 0 and settings.workers == 3


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="VISIONSERVE_PORT='eighty'"):
        load_settings({"repository": tmp_path}, environ={"VISIONSERVE_PORT": "eighty"})


def test_no_repository_anywhere() -> None:
    with pytest.raises(ValueError, match="--repository DIR or set VISIONSERVE_REPOSITORY"):
        load_settings({}, environ={})


def test_batching_overrides_and_new_environment_variables(tmp_path: Path) -> None:
    env = {
        "VISIONSERVE_REPOSITORY": str(tmp_path),
        "VISIONSERVE_MAX_BATCH_SIZE": "16",
        "VISIONSERVE_MAX_QUEUE_DELAY_MS": "0.5",
        "VISIONSERVE_MODEL_CONTROL": "poll",
        "VISIONSERVE_METRICS_PORT": "0",
        "VISIONSERVE_AUTH_TOKEN": "tok",
    }
    settings = load_settings({"instances": 2}, environ=env)
    assert settings.batching_overrides() == {
        "max_batch_size": 16,
        "max_queue_delay_ms": 0.5,
        "instances": 2,
    }
    assert (settings.model_control, settings.metrics_port, settings.auth_token) == (
        "poll",
        0,
        "tok",
    )
    assert ServerSettings(repository=tmp_path).batching_overrides() == {}


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_batch_size", 0, "max_batch_size must be at least 1"),
        ("instances", 0, "instances must be at least 1"),
        ("max_queue_size", 0, "max_queue_size must be at least 1"),
        ("max_queue_delay_ms", -1.0, "max_queue_delay_ms must be >= 0"),
        ("metrics_port", 70000, "metrics_port must be in 0..65535"),
        ("model_control", "auto", "model_control must be one of"),
        ("poll_interval_s", 0.0, "poll_interval_s must be > 0"),
        ("auth_token", " ", "auth_token must not be empty"),
    ],
)
def test_new_settings_are_checked(tmp_path: Path, field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerSettings(repository=tmp_path, **{field: value})


def test_the_cli_options_reach_the_settings(tmp_path: Path) -> None:
    from visionserve.cli import build_parser
    from visionserve.commands.serve import _overrides

    token = tmp_path / "token"
    token.write_text("abc\n")
    argv = [
        "serve",
        "--repository",
        str(tmp_path),
        "--max-batch-size",
        "3",
        "--instances",
        "2",
        "--max-queue-size",
        "9",
        "--max-queue-delay-ms",
        "1.5",
        "--metrics-port",
        "9100",
        "--model-control",
        "explicit",
        "--load-model",
        "a",
        "--load-model",
        "b",
        "--auth-token-file",
        str(token),
    ]
    settings = load_settings(_overrides(build_parser(argv).parse_args(argv)), environ={})
    assert settings.batching_overrides() == {
        "max_batch_size": 3,
        "max_queue_delay_ms": 1.5,
        "instances": 2,
        "max_queue_size": 9,
    }
    assert settings.metrics_port == 9100 and settings.load_models == ("a", "b")
    assert settings.model_control == "explicit" and settings.auth_token == "abc"


def test_model_yaml_batching_fields_are_checked() -> None:
    from visionserve.server.model_config import ModelConfig

    base = {
        "name": "m",
        "task": "classification",
        "labels": ["a", "b"],
        "outputs": {"probabilities": "p"},
    }
    assert ModelConfig(**base).instances == 1
    for field, match in (
        ("instances", "instances must be at least 1"),
        ("max_queue_size", "max_queue_size must be at least 1"),
    ):
        with pytest.raises(ValueError, match=match):
            ModelConfig(**base, **{field: 0})


def test_platform_environment_gives_defaults_kserve_sets(tmp_path: Path) -> None:
    """KServe: PORT (Knative) and STORAGE_URI (rewritten to the local model folder)."""
    settings = load_settings({}, environ={"PORT": "9010", "STORAGE_URI": str(tmp_path)})
    assert (settings.port, settings.repository) == (9010, tmp_path)
    ours = {"VISIONSERVE_PORT": "9020", "VISIONSERVE_REPOSITORY": str(tmp_path / "x")}
    (tmp_path / "x").mkdir()
    settings = load_settings({}, environ={"PORT": "9010", "STORAGE_URI": str(tmp_path), **ours})
    assert (settings.port, settings.repository) == (9020, tmp_path / "x")
    with pytest.raises(ValueError, match="STORAGE_URI='s3://bucket/models' is not a local folder"):
        load_settings({}, environ={"STORAGE_URI": "s3://bucket/models"})  # not downloaded
    with pytest.raises(ValueError, match="PORT='h2c': expected a int"):
        load_settings({"repository": tmp_path}, environ={"PORT": "h2c"})


def test_backends_override_every_model(tmp_path: Path) -> None:
    from visionserve.cli import build_parser
    from visionserve.commands.serve import _overrides

    env = {
        "VISIONSERVE_REPOSITORY": str(tmp_path),
        "VISIONSERVE_BACKENDS": "tensorrt, onnxruntime-cuda",
    }
    settings = load_settings({}, environ=env)
    assert settings.batching_overrides() == {"backends": ("tensorrt", "onnxruntime-cuda")}
    argv = ["serve", "--repository", str(tmp_path), "--backends", "onnxruntime-cpu"]
    settings = load_settings(_overrides(build_parser(argv).parse_args(argv)), environ=env)
    assert settings.backends == ("onnxruntime-cpu",)
    with pytest.raises(ValueError, match="backends must be a non-empty list from"):
        ServerSettings(repository=tmp_path, backends=("tensorflow",))
