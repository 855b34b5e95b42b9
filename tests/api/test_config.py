"""kubeinfer-serve's settings: flags over KUBEINFER_* environment variables over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubeinfer_serving.__main__ import build_provider
from kubeinfer_serving.config import parse_settings


def test_defaults_serve_on_port_8000_with_no_model_flags() -> None:
    s = parse_settings([], env={})
    assert (s.host, s.port, s.models_config, s.model_dir) == ("0.0.0.0", 8000, None, None)


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {"KUBEINFER_PORT": "9001", "KUBEINFER_HOST": "10.0.0.1", "KUBEINFER_MODELS_CONFIG": "/etc/m.yaml"}
    s = parse_settings(["--port", "9002", "--max-num-seqs", "4"], env=env)
    assert s.port == 9002 and s.host == "10.0.0.1" and s.models_config == Path("/etc/m.yaml")
    assert s.max_num_seqs == 4


def test_invalid_values_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        parse_settings(["--max-num-seqs", "0"], env={})
    assert err.value.code == 2
    assert "max-num-seqs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings([], env={"KUBEINFER_PORT": "http"})


def test_no_model_flags_serve_the_default_catalogue_through_the_registry() -> None:
    from kubeinfer_serving.registry.manager import ModelRegistry

    argv = ["--max-num-seqs", "4", "--max-waiting-requests", "3", "--device", "cpu"]
    provider = build_provider(parse_settings(argv, env={}))
    assert isinstance(provider, ModelRegistry)
    assert [m.name for m in provider.list_models()] == ["smollm2-135m-instruct", "tiny-llama", "all-minilm-l6-v2"]
    assert all(m.preload for m in provider.list_models())
    assert provider.catalogue.max_num_seqs == 4
    assert provider.catalogue.max_waiting_requests == 3


def test_model_dir_is_single_model_mode_named_after_the_directory(tmp_path: Path) -> None:
    """--model-dir is a one-entry catalogue served by the registry: the model preloaded, the flags applied."""
    from kubeinfer_serving.registry.manager import ModelRegistry

    argv = ["--model-dir", str(tmp_path / "llama-1b"), "--max-num-seqs", "4", "--dtype", "bf16",
            "--max-model-len", "512", "--memory-budget-bytes", str(1 << 30)]
    provider = build_provider(parse_settings(argv, env={}))
    assert isinstance(provider, ModelRegistry)
    assert [m.name for m in provider.list_models()] == ["llama-1b"]
    assert provider.list_models()[0].state.value == "unloaded" and provider.list_models()[0].preload
    [entry] = provider.catalogue.models
    assert (entry.dtype, entry.max_model_len, provider.catalogue.max_num_seqs) == ("bfloat16", 512, 4)
    assert entry.source == str(tmp_path / "llama-1b") and provider.budget_bytes == 1 << 30


def test_single_model_mode_keeps_vllm_style_names_and_refuses_a_bad_dtype(tmp_path: Path) -> None:
    argv = ["--model-dir", str(tmp_path), "--served-model-name", "meta-llama/Llama-3.2-1B"]
    assert [m.name for m in build_provider(parse_settings(argv, env={})).list_models()] == ["meta-llama/Llama-3.2-1B"]
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        build_provider(parse_settings(["--model-dir", str(tmp_path), "--dtype", "int3"], env={}))


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-model-len", "512"],
        ["--model-dir", "/m", "--models-config", "/c.yaml"],
        ["--model-dir", "/m", "--idle-timeout-seconds", "10"],
    ],
)
def test_flags_of_the_other_mode_are_refused(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="--"):
        build_provider(parse_settings(argv, env={}))


def test_enforce_eager_flag_and_variable_reach_the_catalogue(tmp_path: Path) -> None:
    """--enforce-eager (vLLM's flag) / KUBEINFER_ENFORCE_EAGER set the catalogue's pod-level
    enforceEager in both modes; without them the catalogue's own value (default off) stays."""
    single = build_provider(parse_settings(["--model-dir", str(tmp_path), "--enforce-eager"], env={}))
    assert single.catalogue.enforce_eager_for(single.catalogue.models[0])
    plain = build_provider(parse_settings(["--model-dir", str(tmp_path)], env={}))
    assert not plain.catalogue.enforce_eager_for(plain.catalogue.models[0])
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - {name: a, source: /a}\n  - {name: b, source: /b, enforceEager: false}\n")
    catalogue = build_provider(parse_settings(["--models-config", str(config)], env={"KUBEINFER_ENFORCE_EAGER": "true"}))
    a, b = catalogue.catalogue.models
    assert catalogue.catalogue.enforce_eager_for(a) and not catalogue.catalogue.enforce_eager_for(b)
    config.write_text("enforceEager: true\nmodels:\n  - {name: a, source: /a}\n")
    kept = build_provider(parse_settings(["--models-config", str(config)], env={}))
    assert kept.catalogue.enforce_eager_for(kept.catalogue.models[0])


@pytest.mark.parametrize(("source", "name"), [
    ("builtin://smollm2-135m-instruct", "smollm2-135m-instruct"),
    ("hf://Qwen/Qwen2.5-0.5B-Instruct@main", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("s3://models/team/llama-1b", "llama-1b"),
    ("pvc://store/llama/SmolLM2.Q4_1.gguf", "SmolLM2.Q4_1"),
    ("file:///opt/models/llama-1b", "llama-1b"),
])
def test_model_takes_any_source_named_as_vllm_names_it(source: str, name: str) -> None:
    provider = build_provider(parse_settings(["--model", source, "--quantization", "int8"], env={}))
    [entry] = provider.catalogue.models
    assert (entry.name, entry.source, entry.quantization, entry.preload) == (name, source, "int8", True)


def test_model_and_model_dir_together_are_refused_and_a_plain_path_is_made_absolute(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    with pytest.raises(ValueError, match="--model and --model-dir"):
        build_provider(parse_settings(["--model", "builtin://tiny-llama", "--model-dir", str(tmp_path)], env={}))
    monkeypatch.chdir(tmp_path)
    [entry] = build_provider(parse_settings(["--model", "m.gguf"], env={})).catalogue.models
    assert (entry.name, entry.source) == ("m", str(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match="--quantization needs --model"):
        build_provider(parse_settings(["--quantization", "int8"], env={}))
