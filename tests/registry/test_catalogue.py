"""The catalogue file: YAML/JSON with camelCase keys, validation messages, env var and default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubeinfer_serving.registry.catalogue import (
    MODELS_CONFIG_ENV,
    CatalogueError,
    catalogue_from_config,
    default_catalogue,
    load_catalogue,
)
from kubeinfer_serving.registry.protocol import ModelKind

YAML = """
maxLoadedModels: 2
gpuMemoryUtilization: 0.8
warmCacheBytes: 1073741824
models:
  - name: llama-1b
    source: pvc://model-store/llama-3.2-1b
    preload: true
    dtype: bfloat16
    maxModelLen: 4096
  - name: minilm
    source: file:///opt/models/minilm
    kind: embed
"""


def test_yaml_with_camel_case_keys(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(YAML)
    cat = load_catalogue(f)
    assert cat.max_loaded_models == 2 and cat.gpu_memory_utilization == 0.8 and cat.memory_budget_bytes is None
    assert cat.warm_cache_bytes == 1 << 30
    llama, minilm = cat.models
    assert (llama.name, llama.preload, llama.dtype, llama.max_model_len, llama.kind) == (
        "llama-1b", True, "bfloat16", 4096, ModelKind.GENERATE)
    assert (minilm.kind, minilm.preload, minilm.dtype) == (ModelKind.EMBED, False, "auto")
    assert cat.entry("minilm") is minilm and cat.entry("other") is None


def test_json_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "models.json"
    f.write_text(json.dumps({"memoryBudgetBytes": 123456789, "models": [{"name": "a", "source": "/m/a"}]}))
    cat = load_catalogue(f)
    assert cat.memory_budget_bytes == 123456789 and cat.models[0].source == "/m/a"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"models": [{"name": "a", "source": "/x"}, {"name": "a", "source": "/y"}]}, "repeated: a"),
        ({"memoryBudgetBytes": 1, "gpuMemoryUtilization": 0.5, "models": [{"name": "a", "source": "/x"}]},
         "not both"),
        ({"models": [{"name": "a", "source": "gs://bucket/a"}]}, "must be pvc://"),
        ({"models": [{"name": "a", "source": "/x", "maxModelLen": 0}]}, "models.0.maxModelLen"),
        ({"models": [{"name": "a", "source": "/x", "kind": "rerank"}]}, "models.0.kind"),
        ({"models": [{"name": "a b", "source": "/x"}]}, "models.0.name"),
        ({"models": [{"name": "a", "source": "/x", "prelaod": True}]}, "prelaod"),
        ({"models": []}, "models"),
        ({"gpuMemoryUtilization": 1.5, "models": [{"name": "a", "source": "/x"}]}, "gpuMemoryUtilization"),
    ],
)
def test_invalid_catalogues_are_rejected_with_the_key(tmp_path: Path, doc: dict, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(json.dumps(doc))
    with pytest.raises(CatalogueError, match=message) as err:
        load_catalogue(f)
    assert str(f) in str(err.value)


def test_unreadable_or_unparsable_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="cannot read"):
        load_catalogue(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("models: [unclosed")
    with pytest.raises(CatalogueError, match="not valid YAML"):
        load_catalogue(tmp_path / "broken.yaml")


def test_default_catalogue_has_the_builtin_models() -> None:
    cat = default_catalogue()
    assert [(m.name, m.kind, m.preload) for m in cat.models] == [
        ("smollm2-135m-instruct", ModelKind.GENERATE, True),
        ("tiny-llama", ModelKind.GENERATE, True),
        ("all-minilm-l6-v2", ModelKind.EMBED, True),
    ]


def test_config_path_then_env_var_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(YAML)
    monkeypatch.delenv(MODELS_CONFIG_ENV, raising=False)
    assert catalogue_from_config(None) == default_catalogue()
    monkeypatch.setenv(MODELS_CONFIG_ENV, str(f))
    assert catalogue_from_config(None).models[0].name == "llama-1b"
    other = tmp_path / "other.yaml"
    other.write_text("models: [{name: x, source: /x}]")
    assert catalogue_from_config(other).models[0].name == "x"
