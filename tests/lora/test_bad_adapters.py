"""Adapters that cannot run on the base model are refused with a reason naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.lora.adapter import AdapterLoadError, LoRAShapes
from kubeinfer_serving.lora.peft_format import load_peft_adapter
from safetensors.torch import load_file, save_file

from tests.lora.peft_adapters import AdapterSpec, make_adapter


@pytest.fixture(scope="module")
def shapes(tiny):
    return LoRAShapes.from_hf_config(tiny[0])


def _copy(src, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_rank_above_max_lora_rank(adapter_dirs, shapes):
    with pytest.raises(AdapterLoadError, match=r"rank 16 of .* exceeds maxLoraRank 8"):
        load_peft_adapter(adapter_dirs["mlp-o-r16-rslora"], "big", shapes, max_rank=8)


def test_adapter_made_for_another_base_model(tmp_path, shapes):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=8192))
    torch.manual_seed(0)
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "other")
    with pytest.raises(AdapterLoadError, match=r"do not fit the base model's q_proj \(256 in, 256 out\)"):
        load_peft_adapter(tmp_path / "other", "other", shapes, max_rank=16)


def test_target_module_listed_without_weights(adapter_dirs, shapes, tmp_path):
    bad = _copy(adapter_dirs["qv-r8"], tmp_path)
    tensors = load_file(bad / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".v_proj." not in k}, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match=r"target modules \['v_proj'\] are listed .* but have no weights"):
        load_peft_adapter(bad, "bad", shapes, max_rank=16)


def test_target_module_the_base_model_lacks(tiny_dir, shapes, tmp_path):
    bad = make_adapter(tiny_dir, AdapterSpec("x", 0, 4, 8, ("q_proj",)), tmp_path / "x")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match=r"targets modules the base model has no LoRA support for: \['c_attn'\]"):
        load_peft_adapter(bad, "x", shapes, max_rank=16)


def test_truncated_weights_file(adapter_dirs, shapes, tmp_path):
    bad = _copy(adapter_dirs["all-r4"], tmp_path)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match=r"'bad': corrupt adapter_model.safetensors"):
        load_peft_adapter(bad, "bad", shapes, max_rank=16)


def test_unparsable_config_and_missing_files(adapter_dirs, shapes, tmp_path):
    bad = _copy(adapter_dirs["all-r4"], tmp_path)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="cannot parse adapter_config.json"):
        load_peft_adapter(bad, "bad", shapes, max_rank=16)
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere", "bad", shapes, max_rank=16)


def test_dora_and_non_finite_values_are_refused(adapter_dirs, shapes, tmp_path):
    dora = _copy(adapter_dirs["qv-r8"], tmp_path, "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="use_dora=True is not supported"):
        load_peft_adapter(dora, "dora", shapes, max_rank=16)
    nan = _copy(adapter_dirs["qv-r8"], tmp_path, "nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="NaN or infinite"):
        load_peft_adapter(nan, "nan", shapes, max_rank=16)


def test_engine_refuses_an_adapter_above_its_rank_and_keeps_serving_the_others(lora_engine, adapter_dirs, shapes):
    engine = lora_engine(max_lora_rank=16)
    big = load_peft_adapter(adapter_dirs["mlp-o-r16-rslora"], "big", shapes, max_rank=32)
    small = lora_engine(with_adapters=False, max_lora_rank=8)
    with pytest.raises(AdapterLoadError, match="rank 16 exceeds maxLoraRank 8"):
        small.add_lora(big)
    engine.add_lora(big)
    with pytest.raises(ValueError, match="already loaded"):
        engine.add_lora(big)
    engine.add_request("ok", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), lora="qv-r8")
    while engine.has_unfinished_requests():
        engine.step()
