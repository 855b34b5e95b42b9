"""Loading checkpoints into our Llama: merged projections, own-name snapshots, missing shards."""

from __future__ import annotations

import pytest
import torch
from kubeinfer_serving.models import loader
from kubeinfer_serving.models.llama import LlamaForCausalLM, WeightLoadError


def _model(config) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, max_positions=64, dtype=torch.float32, device=torch.device("cpu"))


def test_split_projections_land_in_the_rows_of_the_merged_ones(tiny_seed0):
    config = loader.load_hf_config(tiny_seed0)
    weights = dict(loader.iter_safetensors(tiny_seed0))
    model = _model(config)
    model.load_weights(weights.items())
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q, k, v = attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])
    assert torch.equal(q, weights["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k, weights["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v, weights["model.layers.1.self_attn.v_proj.weight"])
    gate, up = mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, weights["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(up, weights["model.layers.1.mlp.up_proj.weight"])
    # a snapshot under our own names (the registry's warm offload) loads back identically
    again = _model(config)
    again.load_weights((n, p.detach().clone()) for n, p in model.named_parameters())
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_a_missing_shard_of_a_merged_projection_is_reported(tiny_seed0):
    config = loader.load_hf_config(tiny_seed0)
    weights = dict(loader.iter_safetensors(tiny_seed0))
    del weights["model.layers.2.self_attn.k_proj.weight"]
    with pytest.raises(WeightLoadError, match="lacks 1 tensors.*layers.2.self_attn.qkv_proj"):
        _model(config).load_weights(weights.items())
    weights = dict(loader.iter_safetensors(tiny_seed0))
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightLoadError, match="up_proj.weight: checkpoint shape"):
        _model(config).load_weights(weights.items())
