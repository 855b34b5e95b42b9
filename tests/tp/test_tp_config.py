"""Configuring tensor parallelism: the catalogue field, the single-model flag, and a catalogue model
whose heads do not divide (Failed with the numbers while the rest of the pod serves)."""

from __future__ import annotations

import asyncio

import pytest
from kubeinfer_serving.__main__ import build_provider
from kubeinfer_serving.config import parse_settings
from kubeinfer_serving.registry.catalogue import Catalogue, CatalogueError, ModelEntry, parse_catalogue
from kubeinfer_serving.registry.manager import ModelRegistry
from kubeinfer_serving.registry.protocol import ModelState


def test_flag_and_environment_set_the_single_model_split_and_belong_to_single_model_mode(tmp_path):
    cat = build_provider(parse_settings(["--model", "builtin://tiny-llama", "--tensor-parallel-size", "2"],
                                        env={})).catalogue
    assert cat.models[0].tensor_parallel_size == 2
    cat = build_provider(parse_settings(["--model", "builtin://tiny-llama"],
                                        env={"KUBEINFER_TENSOR_PARALLEL_SIZE": "4"})).catalogue
    assert cat.models[0].tensor_parallel_size == 4
    with pytest.raises(ValueError, match="--tensor-parallel-size needs --model"):
        build_provider(parse_settings(["--tensor-parallel-size", "2"], env={}))
    with pytest.raises(SystemExit):
        parse_settings(["--model", "builtin://tiny-llama", "--tensor-parallel-size", "0"], env={})


def test_catalogue_field_is_checked():
    assert parse_catalogue({"models": [{"name": "m", "source": "builtin://tiny-llama",
                                        "tensorParallelSize": 2}]}).models[0].tensor_parallel_size == 2
    for bad in ({"tensorParallelSize": 0}, {"tensorParallelSize": 2, "kind": "embed"},
                {"tensorParallelSize": 2, "adapters": [{"name": "a", "source": "s3://bucket/a"}]}):
        with pytest.raises(CatalogueError):
            parse_catalogue({"models": [{"name": "m", "source": "builtin://tiny-llama", **bad}]})


def test_a_model_whose_heads_do_not_divide_fails_with_the_numbers_and_the_others_load(tiny_dir):
    catalogue = Catalogue(models=[
        ModelEntry(name="split-3", source=str(tiny_dir), preload=True, tensor_parallel_size=3),
        ModelEntry(name="whole", source=str(tiny_dir), preload=True, max_model_len=256),
    ], memory_budget_bytes=2 * 1024**3)

    async def scenario():
        registry = ModelRegistry(catalogue, device="cpu")
        await registry.start()
        try:
            info = {m.name: m for m in registry.list_models()}
            assert info["split-3"].state is ModelState.FAILED
            assert "4 attention heads do not divide by tensor parallel size 3" in info["split-3"].message
            assert info["whole"].state is ModelState.LOADED
        finally:
            await registry.shutdown()

    asyncio.run(scenario())
