"""oneDNN-packed linear layers on CPU: same products as ``F.linear``, same parameters, repacked on change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kubeinfer_serving.layers.linear import (
    PACKED_LINEAR_ENV,
    PackedLinear,
    pack_linear_layers,
    packed_linear_available,
)
from torch import nn

pytestmark = pytest.mark.skipif(not packed_linear_available(), reason="this PyTorch build has no oneDNN")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(32, 48, bias=True), nn.ReLU(), nn.Linear(48, 16, bias=False))
        self.head = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.head(self.inner(x))


@pytest.mark.parametrize("rows", [1, 3, 64, 700])
def test_packed_linear_gives_the_float32_product(rows):
    torch.manual_seed(rows)
    layer = nn.Linear(96, 40)
    x = torch.randn(rows, 96)
    packed = PackedLinear.from_linear(layer)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        x3 = torch.randn(2, rows, 96)
        torch.testing.assert_close(packed(x3), F.linear(x3, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        strided = torch.randn(rows, 192)[:, ::2]
        torch.testing.assert_close(packed(strided), F.linear(strided, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_pack_linear_layers_keeps_parameters_and_outputs():
    torch.manual_seed(0)
    net = _Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 32)
    with torch.inference_mode():
        ref = net(x)
    assert pack_linear_layers(net) == 3
    assert all(isinstance(m, PackedLinear) for m in (net.inner[0], net.inner[2], net.head))
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_weights_written_after_packing_are_used():
    torch.manual_seed(1)
    layer = PackedLinear.from_linear(nn.Linear(16, 16, bias=False))
    x = torch.randn(4, 16)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(16) * 2)  # e.g. load_weights after the engine packed the layer
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), 2 * x)


def test_tied_weights_stay_tied():
    emb = nn.Embedding(10, 8)
    model = nn.Module()
    model.embed = emb
    model.lm_head = nn.Linear(8, 10, bias=False)
    model.lm_head.weight = emb.weight
    pack_linear_layers(model)
    assert model.lm_head.weight is emb.weight


def test_switched_off_or_not_float32_keeps_plain_linear(monkeypatch):
    net = _Net()
    monkeypatch.setenv(PACKED_LINEAR_ENV, "0")
    assert pack_linear_layers(net) == 0
    monkeypatch.delenv(PACKED_LINEAR_ENV)
    half = _Net().to(torch.bfloat16)
    assert pack_linear_layers(half) == 0
    assert type(half.head) is nn.Linear
