"""Adapters in the catalogue: validation, and their bytes in the model's budget."""

from __future__ import annotations

import asyncio

import pytest
import torch
from kubeinfer_serving.lora.adapter import LoRAShapes
from kubeinfer_serving.lora.slots import LoRASlots
from kubeinfer_serving.registry.catalogue import CatalogueError, parse_catalogue
from kubeinfer_serving.registry.manager import ModelRegistry


def _cat(models, **pod):
    return parse_catalogue({"models": models, **pod})


def test_adapter_names_share_the_model_namespace():
    with pytest.raises(CatalogueError, match="names must be unique; repeated: m"):
        _cat([{"name": "m", "source": "/x", "adapters": [{"name": "m", "source": "/a"}]}])
    with pytest.raises(CatalogueError, match="repeated: a"):
        _cat([{"name": "m", "source": "/x", "adapters": [{"name": "a", "source": "/a"}]},
              {"name": "n", "source": "/y", "adapters": [{"name": "a", "source": "/b"}]}])


def test_adapter_sources_and_kinds():
    with pytest.raises(CatalogueError, match="only generate models take LoRA adapters"):
        _cat([{"name": "e", "source": "/x", "kind": "embed", "adapters": [{"name": "a", "source": "/a"}]}])
    with pytest.raises(CatalogueError, match="cannot be builtin"):
        _cat([{"name": "m", "source": "/x", "adapters": [{"name": "a", "source": "builtin://tiny-llama"}]}])
    cat = _cat([{"name": "m", "source": "/x", "adapters": [
        {"name": "org/a", "source": "hf://org/a@main"}, {"name": "b", "source": "s3://bucket/b"},
        {"name": "c", "source": "pvc://claim/c"}]}], maxLoras=3, maxLoraRank=64)
    assert [a.name for a in cat.models[0].adapters] == ["org/a", "b", "c"]
    assert cat.adapter("b")[0].name == "m" and cat.adapter("m") is None
    assert (cat.max_loras, cat.max_lora_rank) == (3, 64)


def test_adapters_count_in_the_model_bytes(tiny, tiny_dir, adapter_dirs):
    def loaded_bytes(adapters):
        cat = _cat([{"name": "m", "source": str(tiny_dir), "maxModelLen": 256, "kvCacheBytes": 1 << 22,
                     "adapters": adapters}], memoryBudgetBytes=1 << 31, maxLoras=2, maxLoraRank=16)
        reg = ModelRegistry(cat, device="cpu")

        async def run():
            info = await reg.load("m")
            infos = reg.list_models()
            await reg.shutdown()
            return info, infos

        return asyncio.run(run())

    base, _ = loaded_bytes([])
    names = ["qv-r8", "all-r4"]
    with_adapters, infos = loaded_bytes([{"name": n, "source": adapter_dirs[n].as_uri()} for n in names])
    adapter_bytes = [i.bytes for i in infos if i.parent == "m"]
    assert len(adapter_bytes) == 2 and all(b > 0 for b in adapter_bytes)
    slots = LoRASlots.bytes_for(LoRAShapes.from_hf_config(tiny[0]), 2, 16, torch.float32)
    assert with_adapters.bytes - base.bytes == slots + sum(adapter_bytes)
