"""The settings' sources (pydantic-settings): constructor/flags over KUBEINFER_* variables over defaults."""

from __future__ import annotations

import pytest
from kubeinfer_serving.config import ServerSettings, parse_settings

SECRET = "sk-sources-secret-77"


def test_the_constructor_reads_the_environment_under_its_own_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEINFER_PORT", "9100")
    monkeypatch.setenv("KUBEINFER_MAX_NUM_SEQS", "3")
    monkeypatch.setenv("KUBEINFER_HOST", "")  # empty: not set
    s = ServerSettings(port=9200)
    assert (s.port, s.max_num_seqs, s.host) == (9200, 3, "0.0.0.0")
    assert s.given("max_num_seqs") and not s.given("host")


def test_list_variables_are_comma_separated_not_json() -> None:
    env = {"KUBEINFER_API_KEYS": f"{SECRET}=team-a, sk-two", "KUBEINFER_LORA_MODULES": "a=s3://b/x,b=/y",
           "KUBEINFER_ALLOWED_ORIGINS": "https://a.example/,https://b.example",
           "KUBEINFER_STRUCTURED_OUTPUTS_CONFIG": '{"disable_additional_properties": false}'}
    s = parse_settings([], env=env)
    assert s.api_keys == [f"{SECRET}=team-a", "sk-two"]
    assert s.lora_modules == ["a=s3://b/x", "b=/y"]
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert s.structured_outputs_config.disable_additional_properties is False
    assert parse_settings(["--api-key", "sk-flag"], env=env).api_keys == ["sk-flag"]  # the flag wins


def test_errors_name_flag_and_variable_and_hide_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings([], env={"KUBEINFER_STRUCTURED_OUTPUTS_CONFIG": "{not json", "KUBEINFER_API_KEYS": SECRET})
    err = capsys.readouterr().err
    assert "--structured-outputs-config / KUBEINFER_STRUCTURED_OUTPUTS_CONFIG: Value error, not a JSON object" in err
    assert SECRET not in err

