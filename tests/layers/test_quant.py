"""Weight quantization layers (kubeinfer_serving.layers.quant) on CPU; fp8 runs on CUDA only."""

from __future__ import annotations

import pytest
import torch
from kubeinfer_serving.layers.quant import (
    Fp8Linear,
    Int8Linear,
    QuantizationError,
    quantize_linear_layers,
    quantized_weight_bytes,
)
from torch import nn


def _mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96, bias=True), nn.SiLU(), nn.Linear(96, 32, bias=False)).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_per_channel_rounded_product(dtype: torch.dtype) -> None:
    layer = _mlp(dtype)[0]
    q = Int8Linear.from_linear(layer)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (96,)
    x = torch.randn(5, 3, 64, dtype=dtype)
    dequant = q.weight.float() * q.scale[:, None]
    want = (x.float() @ dequant.t() + layer.bias.float()).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(q(x), want, atol=tol, rtol=tol)
    # Round to nearest: every weight within half a step of the original.
    assert ((dequant - layer.weight.float()).abs() <= q.scale[:, None] / 2 + 1e-6).all()


def test_quantize_linear_layers_swaps_all_but_skipped_and_quarters_the_bytes() -> None:
    model = nn.Module()
    model.body = _mlp()
    model.lm_head = nn.Linear(32, 10, bias=False)
    before = sum(p.numel() * p.element_size() for p in model.body.parameters())
    assert quantize_linear_layers(model, "int8") == 2
    assert isinstance(model.body[0], Int8Linear) and type(model.lm_head) is nn.Linear
    after = sum(p.numel() * p.element_size() for p in model.body.parameters())
    assert after < before / 3
    assert quantize_linear_layers(_mlp(), "none") == 0


def test_fp8_is_refused_off_cuda() -> None:
    with pytest.raises(QuantizationError, match="fp8 quantization needs a CUDA device"):
        quantize_linear_layers(_mlp(), "fp8")
    with pytest.raises(QuantizationError, match="unknown quantization"):
        quantize_linear_layers(_mlp(), "int4")


@pytest.mark.cuda
def test_fp8_linear_is_close_to_bf16_on_cuda() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need compute capability 8.9+")
    layer = _mlp(torch.bfloat16, "cuda")[0]
    q = Fp8Linear.from_linear(layer)
    x = torch.randn(7, 64, dtype=torch.bfloat16, device="cuda")
    want = layer(x).float()
    got = q(x).float()
    assert got.dtype == torch.float32 and ((got - want).norm() / want.norm()).item() < 0.08


def test_planned_bytes_match_what_a_quantized_llama_holds() -> None:
    from kubeinfer_serving.models.llama import LlamaForCausalLM
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg, max_positions=32, dtype=torch.float32, device=torch.device("cpu"))
    numel = sum(p.numel() for p in model.parameters())
    quantize_linear_layers(model, "int8")
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert quantized_weight_bytes(cfg, numel, 4, "int8") == held
    assert quantized_weight_bytes(cfg, numel, 4, "none") == numel * 4
