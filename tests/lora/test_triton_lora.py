"""The Triton LoRA shrink/expand kernels against plain torch, on CUDA or under Triton's CPU interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubeinfer_serving.lora.adapter import TARGET_MODULES, LoRAAdapter, LoRAShapes, ModuleShape
from kubeinfer_serving.lora.slots import LoRASlots, LoRAStep

SHAPES = LoRAShapes(2, {"qkv": ModuleShape(48, (32, 16, 16)), "o": ModuleShape(32, (48,)),
                        "gate_up": ModuleShape(48, (40, 40)), "down": ModuleShape(40, (48,))})
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapter(name: str, seed: int, rank: int, targets) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(SHAPES.num_layers):
        for t in targets:
            in_f, out_f = SHAPES.target_shape(t)
            weights[(layer, t)] = (torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g) * 0.1)
    return LoRAAdapter(name, name.encode(), rank, weights)


def _slots(device, dtype):
    slots = LoRASlots(SHAPES, 3, 8, dtype, device)
    slots.write(0, _adapter("a", 1, 8, TARGETS))
    slots.write(1, _adapter("b", 2, 3, ("q_proj", "v_proj", "down_proj")))
    slots.write(2, _adapter("c", 3, 5, ("k_proj", "o_proj", "up_proj")))
    return slots


def _reference(adapter: LoRAAdapter | None, layer, module, x):
    """y delta of one row set under one adapter, straight from its per-target weights (float64)."""
    shape = SHAPES.modules[module]
    out = torch.zeros(x.shape[0], shape.out_features, dtype=torch.float64)
    if adapter is None:
        return out
    for (lay, t), (a, b) in adapter.weights.items():
        stacked, index = TARGET_MODULES[t]
        if lay != layer or stacked != module:
            continue
        off = shape.slice_offset(index)
        out[:, off:off + b.shape[0]] += (x.double() @ a.double().t()) @ b.double().t()
    return out


ADAPTERS = [_adapter("a", 1, 8, TARGETS), _adapter("b", 2, 3, ("q_proj", "v_proj", "down_proj")),
            _adapter("c", 3, 5, ("k_proj", "o_proj", "up_proj"))]
#: Row -> slot patterns: decode-like (similar segments: the CPU path pads them into one batch) and a
#: long prefill-like run beside single rows (segment by segment).
ROWS = {"even": [0, -1, 2, 1, 1, 0, -1, 2, 2, 0, 1], "long": [1] * 12 + [0, -1, 2]}


@pytest.mark.parametrize("pattern", sorted(ROWS))
@pytest.mark.parametrize("module", ["qkv", "o", "gate_up", "down"])
def test_torch_path_matches_per_row_reference(module, pattern):
    slots = _slots(torch.device("cpu"), torch.float32)
    rows = np.array(ROWS[pattern], dtype=np.int64)
    step = LoRAStep(slots, rows, torch.device("cpu"))
    assert step.batched == (pattern == "even")
    shape = SHAPES.modules[module]
    x = torch.randn(len(rows), shape.in_features, generator=torch.Generator().manual_seed(3))
    base = torch.randn(len(rows), shape.out_features, generator=torch.Generator().manual_seed(4))
    y = step.apply(0, module, x, base.clone())
    want = base.double() + torch.cat([_reference(ADAPTERS[s] if s >= 0 else None, 0, module, x[i:i + 1])
                                      for i, s in enumerate(rows.tolist())])
    assert torch.allclose(y.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("module", ["qkv", "o", "gate_up", "down"])
def test_kernels_match_per_row_reference_with_mixed_slots(triton_device, module):
    device = triton_device
    adapters = ADAPTERS
    slots = _slots(device, torch.float32)
    rows = np.array(ROWS["even"], dtype=np.int64)
    shape = SHAPES.modules[module]
    x = torch.randn(len(rows), shape.in_features, generator=torch.Generator().manual_seed(7))
    base = torch.randn(len(rows), shape.out_features, generator=torch.Generator().manual_seed(8))
    y = LoRAStep(slots, rows, device, use_triton=True).apply(1, module, x.to(device), base.clone().to(device))
    want = base.double() + torch.cat([_reference(adapters[s] if s >= 0 else None, 1, module, x[i:i + 1])
                                      for i, s in enumerate(rows.tolist())])
    assert torch.allclose(y.cpu().double(), want, atol=1e-4, rtol=1e-4)
    torch_path = LoRAStep(slots, rows, device, use_triton=False).apply(1, module, x.to(device),
                                                                        base.clone().to(device))
    assert torch.allclose(y, torch_path, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[rows == -1], base.to(device)[rows == -1]), "base rows are left untouched"


@pytest.mark.cuda
def test_kernels_in_bfloat16_on_cuda():
    device = torch.device("cuda")
    slots = _slots(device, torch.bfloat16)
    rows = np.array([2, 0, -1, 1] * 16, dtype=np.int64)
    x = torch.randn(len(rows), 48, device=device, dtype=torch.bfloat16)
    base = torch.randn(len(rows), 64, device=device, dtype=torch.bfloat16)
    got = LoRAStep(slots, rows, device).apply(0, "qkv", x, base.clone())
    want = LoRAStep(slots, rows, device, use_triton=False).apply(0, "qkv", x.float(), base.float())
    assert torch.allclose(got.float(), want, atol=0.1, rtol=0.05)
