"""ServerSettings validation and the environment / override precedence; every declared
setting's option and environment variable, parametrized over the declarations."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from visionserve.server.settings import (
    BATCHING_OVERRIDES,
    ENV_VARS,
    MIB,
    PLATFORM_ENV_VARS,
    SETTINGS,
    ServerSettings,
    load_settings,
)
from visionserve.server.settings_spec import Declared


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
        ("front_slice_us", 50, r"front_slice_us must be 0 \(the kernel.s default\) or in 100"),
        ("front_slice_us", 200_000, r"the slices the kernel takes\), got 200000"),
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
    with pytest.raises(ValueError, match="VISIONSERVE_PORT: expected an integer, got 'eighty'"):
        load_settings({"repository": tmp_path}, environ={"VISIONSERVE_PORT": "eighty"})
    with pytest.raises(ValueError, match="VISIONSERVE_WARMUP: expected one of .*'off'.*'maybe'"):
        load_settings({"repository": tmp_path}, environ={"VISIONSERVE_WARMUP": "maybe"})


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
    from visionserve.commands._settings_cli import overrides

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
    settings = load_settings(overrides(build_parser(argv).parse_args(argv)), environ={})
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
    with pytest.raises(ValueError, match="PORT: expected an integer, got 'h2c'"):
        load_settings({"repository": tmp_path}, environ={"PORT": "h2c"})


def test_backends_override_every_model(tmp_path: Path) -> None:
    from visionserve.cli import build_parser
    from visionserve.commands._settings_cli import overrides

    env = {
        "VISIONSERVE_REPOSITORY": str(tmp_path),
        "VISIONSERVE_BACKENDS": "tensorrt, onnxruntime-cuda",
    }
    settings = load_settings({}, environ=env)
    assert settings.batching_overrides() == {"backends": ("tensorrt", "onnxruntime-cuda")}
    argv = ["serve", "--repository", str(tmp_path), "--backends", "onnxruntime-cpu"]
    settings = load_settings(overrides(build_parser(argv).parse_args(argv)), environ=env)
    assert settings.backends == ("onnxruntime-cpu",)
    with pytest.raises(ValueError, match="backends must be a non-empty list from"):
        ServerSettings(repository=tmp_path, backends=("tensorflow",))


# --- every declared setting: its option and its variable reach the field ---------------

# What users, deploy manifests and docs already rely on: these never change name.
FLAGS = {
    "--repository", "--host", "--port", "--workers", "--max-message-mb", "--max-pixels",
    "--intra-op-threads", "--grace", "--no-warmup", "--max-batch-size", "--max-queue-delay-ms",
    "--instances", "--max-queue-size", "--backends", "--admission-wait-ms", "--max-admitted",
    "--metrics-port", "--model-control", "--poll-interval", "--max-streams", "--load-model",
    "--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file",
}  # fmt: skip
VARIABLES = {
    "VISIONSERVE_" + name
    for name in (
        "REPOSITORY", "HOST", "PORT", "WORKERS", "MAX_MESSAGE_BYTES", "MAX_DECODED_PIXELS",
        "DEFAULT_TOP_K", "GRACE_PERIOD_S", "INTRA_OP_THREADS", "MAX_CONCURRENT_RPCS",
        "ACCEPT_AHEAD", "MAX_STREAMS", "ADMISSION_WAIT_MS", "MAX_ADMITTED", "MAX_BATCH_SIZE",
        "MAX_QUEUE_DELAY_MS", "INSTANCES", "MAX_QUEUE_SIZE", "METRICS_PORT", "MODEL_CONTROL",
        "POLL_INTERVAL_S", "TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA", "AUTH_TOKEN", "BACKENDS",
    )
}  # fmt: skip
# Two (text, value) pairs per value type, both valid for every setting of that type
# (but those with a narrower range: SAMPLES_BY_NAME).
SAMPLES = {
    int: [("3", 3), ("7", 7)],
    float: [("2.5", 2.5), ("0.25", 0.25)],
    str: [("10.0.0.1", "10.0.0.1"), ("::1", "::1")],
    tuple[str, ...]: [
        ("onnxruntime-cpu", ("onnxruntime-cpu",)),
        ("tensorrt, onnxruntime-cuda", ("tensorrt", "onnxruntime-cuda")),
    ],
}
SAMPLES_BY_NAME = {"front_slice_us": [("300", 300), ("0", 0)]}  # 100..100000 or 0
# settings valid only together with others (given as plain overrides, not under test)
COMPANIONS = {
    "tls_cert": ("tls_key",),
    "tls_key": ("tls_cert",),
    "tls_client_ca": ("tls_cert", "tls_key"),
}
BY_FLAG = [pytest.param(d, id=d.flag) for d in SETTINGS]
BY_VARIABLE = [pytest.param(d, id=d.env) for d in SETTINGS if d.env]


def test_every_flag_and_variable_of_old_is_still_declared() -> None:
    assert FLAGS <= {d.flag for d in SETTINGS}
    assert VARIABLES <= set(ENV_VARS.values())
    assert PLATFORM_ENV_VARS == {"port": "PORT", "repository": "STORAGE_URI"}
    declared = {f.name for f in fields(ServerSettings)}
    assert {d.name for d in SETTINGS} == declared, "every field is a declared setting"
    assert set(ENV_VARS) == declared - {"load_models"}  # --load-model NAME, repeated, only
    overriding = {"max_batch_size", "max_queue_delay_ms", "instances", "max_queue_size", "backends"}
    assert set(BATCHING_OVERRIDES) == overriding


def samples(declared: Declared, tmp_path: Path) -> list[tuple[str, object]]:
    """Two (text, value) pairs for ``declared``, each valid and not its default."""
    if declared.name in SAMPLES_BY_NAME:
        return SAMPLES_BY_NAME[declared.name]
    if declared.kind is bool:
        return [("0" if declared.default else "1", not declared.default)] * 2
    if declared.spec.choices:
        return [(c, c) for c in declared.spec.choices if c != declared.default]
    if declared.kind is Path:
        made = []
        for stem in ("one", "two"):
            path = tmp_path / f"{declared.name}-{stem}"
            path.mkdir() if declared.name == "repository" else path.write_text("PEM")
            made.append((str(path), path))
        return made
    return SAMPLES[declared.kind]  # a new type: add its samples above


def flag_argv(declared: Declared, text: str, tmp_path: Path) -> list[str]:
    if declared.kind is bool:
        return [declared.flag]
    if declared.spec.from_flag is not None:  # --auth-token-file: a file holding the value
        holder = tmp_path / "from-flag"
        holder.write_text(text + "\n")
        text = str(holder)
    if declared.spec.repeat:
        return [arg for item in text.split(",") for arg in (declared.flag, item.strip())]
    return [declared.flag, text]


def settings_from(
    declared: Declared, tmp_path: Path, argv: list[str], environ: dict[str, str]
) -> ServerSettings:
    from visionserve.cli import build_parser
    from visionserve.commands._settings_cli import overrides

    base: dict[str, object] = {"repository": tmp_path}
    for name in COMPANIONS.get(declared.name, ()):
        base[name] = tmp_path / f"companion-{name}"
        base[name].write_text("PEM")
    base.pop(declared.name, None)
    argv = ["serve", *argv]
    return load_settings({**base, **overrides(build_parser(argv).parse_args(argv))}, environ)


@pytest.mark.parametrize("declared", BY_FLAG)
def test_each_flag_sets_its_setting(declared: Declared, tmp_path: Path) -> None:
    for text, value in samples(declared, tmp_path):
        argv = flag_argv(declared, text, tmp_path)
        settings = settings_from(declared, tmp_path, argv, environ={})
        expected = value * declared.spec.scale if declared.spec.scale != 1 else value
        assert getattr(settings, declared.name) == expected != declared.default, argv


@pytest.mark.parametrize("declared", BY_VARIABLE)
def test_each_variable_sets_its_setting(declared: Declared, tmp_path: Path) -> None:
    for text, value in samples(declared, tmp_path):
        settings = settings_from(declared, tmp_path, [], environ={declared.env: text})
        assert getattr(settings, declared.name) == value != declared.default, text


@pytest.mark.parametrize("declared", BY_VARIABLE)
def test_the_flag_wins_over_the_variable(declared: Declared, tmp_path: Path) -> None:
    (env_text, env_value), (flag_text, flag_value) = samples(declared, tmp_path)
    if declared.kind is bool:  # the flag can only say the opposite of the default
        env_text, env_value = ("1", True) if declared.default else ("0", False)
    argv = flag_argv(declared, flag_text, tmp_path)
    settings = settings_from(declared, tmp_path, argv, environ={declared.env: env_text})
    expected = flag_value * declared.spec.scale if declared.spec.scale != 1 else flag_value
    assert getattr(settings, declared.name) == expected != env_value


def test_max_message_mb_takes_fractions_of_a_mib(tmp_path: Path) -> None:
    from visionserve.cli import build_parser
    from visionserve.commands._settings_cli import overrides

    argv = ["serve", "--max-message-mb", "1.5"]
    assert overrides(build_parser(argv).parse_args(argv)) == {"max_message_bytes": 3 * MIB // 2}


def test_a_bad_option_value_says_what_was_expected(capsys: pytest.CaptureFixture[str]) -> None:
    from visionserve.cli import build_parser

    argv = ["serve", "--port", "eighty"]
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    assert "argument --port: expected an integer, got 'eighty'" in capsys.readouterr().err


def test_an_unreadable_token_file_is_named(tmp_path: Path) -> None:
    from visionserve.cli import build_parser
    from visionserve.commands._settings_cli import overrides

    argv = ["serve", "--auth-token-file", str(tmp_path / "missing")]
    with pytest.raises(ValueError, match="auth token file .*missing' could not be read"):
        overrides(build_parser(argv).parse_args(argv))


def test_every_variable_in_the_deploy_files_is_a_declared_setting() -> None:
    root = Path(__file__).resolve().parents[2]
    files = [*(root / "deploy").rglob("*"), root / "docker-compose.yml"]
    named = {
        var
        for path in files
        if path.is_file()
        for var in re.findall(r"\bVISIONSERVE_[A-Z0-9_]+", path.read_text(errors="replace"))
    }
    assert named, "the deploy files name VISIONSERVE_* variables"
    assert named <= set(ENV_VARS.values()), named - set(ENV_VARS.values())
