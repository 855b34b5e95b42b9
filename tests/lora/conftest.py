"""Fixtures of the LoRA tests: the tiny model, PEFT adapters of it, engines with LoRA slots."""

from __future__ import annotations

import pytest
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.lora.adapter import LoRAShapes
from kubeinfer_serving.lora.peft_format import load_peft_adapter

from tests.engine.conftest import tiny, tiny_dir  # noqa: F401 - fixtures
from tests.lora.peft_adapters import SPECS, make_adapter, merged_model
from tests.triton_fixture import triton_device  # noqa: F401 - fixture


@pytest.fixture(scope="session")
def adapter_dirs(tiny_dir, tmp_path_factory):  # noqa: F811 - fixture
    """Adapter name -> PEFT adapter directory, for every spec of ``SPECS`` (made once)."""
    root = tmp_path_factory.mktemp("adapters")
    return {spec.name: make_adapter(tiny_dir, spec, root / spec.name) for spec in SPECS}


@pytest.fixture(scope="session")
def peft_models(tiny_dir, adapter_dirs):  # noqa: F811 - fixture
    """Function adapter name (None: base) -> PEFT's merged model, memoised."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = merged_model(tiny_dir, None if name is None else adapter_dirs[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def lora_engine(tiny, adapter_dirs):  # noqa: F811 - fixture
    """Factory: a CPU LLMEngine of the tiny model with every PEFT adapter added (unless not
    ``with_adapters``), any EngineConfig fields."""
    hf_config, weights, tokenizer = tiny

    def make(with_adapters: bool = True, **kwargs) -> LLMEngine:
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("max_loras", 4)
        kwargs.setdefault("max_lora_rank", 16)
        kwargs.setdefault("num_kv_blocks", 128)
        engine = LLMEngine.from_weights(hf_config, weights.items(), tokenizer=tokenizer,
                                        config=EngineConfig(**kwargs), model_name="tiny-lora")
        shapes = LoRAShapes.from_hf_config(hf_config)
        for name, path in adapter_dirs.items() if with_adapters else ():
            engine.add_lora(load_peft_adapter(path, name, shapes, engine.config.max_lora_rank))
        return engine

    return make
