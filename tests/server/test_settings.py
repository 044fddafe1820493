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
        ("workers", 0, "workers must be at least 1"),
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
