"""Loading a local model directory: weights, sizes, sources and readable failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kubeinfer_serving.models.builtin import builtin_embedding_model_dir
from kubeinfer_serving.models.loader import (
    ModelLoadError,
    UnsupportedModelError,
    iter_safetensors,
    load_hf_config,
    load_tokenizer,
    resolve_source,
    weights_nbytes,
)
from transformers import LlamaForCausalLM


def test_loads_config_tokenizer_and_every_weight(tiny_seed0: Path) -> None:
    cfg = load_hf_config(tiny_seed0)
    assert cfg.model_type == "llama" and cfg.num_key_value_heads == 2
    assert len(load_tokenizer(tiny_seed0)) == cfg.vocab_size
    weights = dict(iter_safetensors(tiny_seed0))
    expected = LlamaForCausalLM(cfg).state_dict()
    assert weights.keys() == expected.keys()
    assert all(weights[k].shape == expected[k].shape and weights[k].dtype == torch.float32 for k in weights)
    assert weights_nbytes(tiny_seed0) == sum(t.numel() * t.element_size() for t in weights.values())


def test_sharded_checkpoint_reads_like_a_single_file(tiny_seed0: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_seed0, local_files_only=True)
    model.save_pretrained(tmp_path, max_shard_size="8MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    single, sharded = dict(iter_safetensors(tiny_seed0)), dict(iter_safetensors(tmp_path))
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert weights_nbytes(tmp_path) == weights_nbytes(tiny_seed0)


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for fn in (load_hf_config, load_tokenizer, weights_nbytes):
        with pytest.raises(ModelLoadError, match="nowhere"):
            fn(missing)
    with pytest.raises(ModelLoadError, match="nowhere"):
        list(iter_safetensors(missing))


def test_missing_config_and_weights(tiny_seed0: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf_config(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        weights_nbytes(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(tmp_path)


def test_corrupt_safetensors_fail_naming_the_file(tiny_seed0: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_seed0, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"corrupt safetensors file .*truncated/model\.safetensors"):
        list(iter_safetensors(truncated))
    with pytest.raises(ModelLoadError, match="corrupt safetensors"):
        weights_nbytes(truncated)

    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_seed0, garbage)
    (garbage / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ModelLoadError, match=r"garbage/model\.safetensors"):
        list(iter_safetensors(garbage))


def test_missing_shard_named_by_index(tiny_seed0: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_seed0, tmp_path / "m")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        weights_nbytes(tmp_path / "m")


def test_wrong_architecture_is_unsupported_and_named() -> None:
    with pytest.raises(UnsupportedModelError, match="BertModel") as err:
        load_hf_config(builtin_embedding_model_dir())
    assert "LlamaForCausalLM" in str(err.value)  # the message lists what is supported
    assert isinstance(err.value, ModelLoadError)


def test_resolve_source(tmp_path: Path) -> None:
    assert resolve_source("file:///models/a") == Path("/models/a")
    assert resolve_source("/models/b") == Path("/models/b")
    assert resolve_source("rel/dir") == Path("rel/dir")
    assert resolve_source("pvc://store/llama/3b", pvc_root=tmp_path) == tmp_path / "store" / "llama" / "3b"
    for remote in ("hf://meta-llama/Llama-3.2-1B", "s3://bucket/x"):
        with pytest.raises(ModelLoadError, match="disk tier"):
            resolve_source(remote)
    for bad in ("pvc://store", "file://relative", "pvc://store/../etc", "pvc://", "gs://bucket/x"):
        with pytest.raises(ModelLoadError):
            resolve_source(bad)
