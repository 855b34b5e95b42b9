"""Weight quantization of a loaded model's linear layers: ``int8`` (CPU and CUDA) and ``fp8`` (CUDA).

Both quantize each output channel (row of the ``[out, in]`` weight) with its own scale,
``scale = max |w_row| / qmax``, and leave the embeddings, the norms and ``lm_head`` (tied to the
embeddings in small models) in the model's dtype.

* ``int8``: weight-only, ``q = round(w / scale)`` in [-127, 127]. The product is
  ``(x @ q^T) * scale``, exact per channel. With bfloat16/float16 activations it runs PyTorch's
  built-in ``torch._weight_int8pack_mm`` (the operator torchao's int8 weight-only path uses on
  CPU); with float32 activations, where that operator has no fast kernel (measured on this
  project's CPU: about 25x slower than a float32 matmul for one decode row), the int8 weight is
  converted to float32 inside the layer's ``F.linear`` call and the scale applied to the output.
  Bytes: 1 per weight plus one scale per row (a quarter of float32, half of bfloat16).
* ``fp8``: e4m3 weights with per-channel scales and e4m3 activations quantized per token at
  run time (the scheme of vLLM's dynamic fp8), multiplied by ``torch._scaled_mm`` with row-wise
  scales (needs compute capability 8.9 or later: Ada, Hopper). Refused elsewhere with the reason.

:func:`quantize_linear_layers` swaps the layers in place; :func:`quantized_weight_bytes` tells the
registry what a model will hold before it is loaded.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

#: Values of a catalogue entry's ``quantization`` (``none``: the model's dtype).
QUANTIZATION_MODES = ("none", "int8", "fp8")
_FP8 = getattr(torch, "float8_e4m3fn", None)
#: Largest finite e4m3 value.
FP8_MAX = 448.0


class QuantizationError(ValueError):
    """A quantization the device cannot run (fp8 off CUDA or on a GPU without fp8 matmuls)."""


def check_quantization(mode: str, device: torch.device) -> None:
    """Refuse a quantization ``device`` cannot run.

    Raises:
        QuantizationError: an unknown mode, or fp8 on CPU / a GPU older than compute capability 8.9
            / a PyTorch without ``float8_e4m3fn`` and ``_scaled_mm`` (the message says which).
    """
    if mode not in QUANTIZATION_MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZATION_MODES)}")
    if mode != "fp8":
        return
    if device.type != "cuda":
        raise QuantizationError(f"fp8 quantization needs a CUDA device with fp8 matmuls; this model runs on {device}")
    if _FP8 is None or not hasattr(torch, "_scaled_mm"):
        raise QuantizationError("fp8 quantization needs a PyTorch with float8_e4m3fn and torch._scaled_mm")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise QuantizationError(f"fp8 quantization needs compute capability 8.9 or later (Ada, Hopper); "
                                f"{torch.cuda.get_device_name(device)} has {major}.{minor}")


@functools.lru_cache(maxsize=8)
def _int8pack_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._weight_int8pack_mm`` runs for activations of ``dtype`` on ``device_type``."""
    if dtype not in (torch.bfloat16, torch.float16) or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 32, dtype=dtype, device=device_type)
        w = torch.ones(8, 32, dtype=torch.int8, device=device_type)
        torch._weight_int8pack_mm(x, w, torch.ones(8, dtype=dtype, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer with per-output-channel scales.

    Attributes:
        weight: ``[out, in]`` int8 (a non-trainable parameter, so it moves and counts as one).
        scale: ``[out]`` float32: ``w ~= weight * scale[:, None]`` (cast to the activation dtype per call).
        bias: ``[out]`` or None.

    Input ``[..., in]`` -> output ``[..., out]`` in the input's dtype.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Int8Linear:
        """Quantize ``layer``'s weight (``scale = max |row| / 127``, rounding to nearest)."""
        w = layer.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = layer.bias.detach() if layer.bias is not None else None
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (weight * scale)^T + bias`` for ``x`` of shape ``[..., in]``."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if _int8pack_mm_works(x.device.type, x.dtype):
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale.to(x.dtype))
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


class Fp8Linear(nn.Module):
    """fp8 (e4m3) linear layer: per-channel weight scales, per-token activation scales (CUDA).

    Attributes:
        weight: ``[out, in]`` float8_e4m3fn.
        scale: ``[1, out]`` float32 weight scales.
        bias: ``[out]`` or None.

    Input ``[..., in]`` (bfloat16/float16) -> output ``[..., out]`` in the input's dtype.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale.view(1, -1), requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Fp8Linear:
        """Quantize ``layer``'s weight to e4m3 with ``scale = max |row| / 448``."""
        w = layer.weight.detach().float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(_FP8)
        bias = layer.bias.detach() if layer.bias is not None else None
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize each row of ``x`` to e4m3 and multiply with ``torch._scaled_mm`` (row-wise scales)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(_FP8)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.scale, out_dtype=x.dtype,
                             bias=self.bias)
        return y.view(*lead, self.out_features)


_LAYERS = {"int8": Int8Linear, "fp8": Fp8Linear}


def quantize_linear_layers(model: nn.Module, mode: str, *, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` of ``model`` (but the ``skip`` names) by its ``mode`` version.

    Args:
        model: the loaded model (weights final).
        mode: ``int8`` or ``fp8`` (``none``: nothing changes).
        skip: child names left in the model's dtype (``lm_head``: tied to the embeddings in small
            models, and the layer whose error every token's logits see).

    Returns:
        how many layers were replaced.

    Raises:
        QuantizationError: as :func:`check_quantization` for the model's device.
    """
    if mode == "none":
        return 0
    check_quantization(mode, next(model.parameters()).device)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(parent, name, _LAYERS[mode].from_linear(child))
                count += 1
    return count


def quantized_weight_bytes(config, numel: int, elem: int, mode: str) -> int:
    """Bytes a Llama-family model's weights take once loaded with ``mode`` (before loading it).

    Args:
        config: the Hugging Face config (hidden size, heads, layers, intermediate size).
        numel: elements of all its weights; ``elem``: bytes per element of the model's dtype.
        mode: ``none``, ``int8`` or ``fp8``.

    Returns:
        ``numel * elem`` for ``none``; else the decoder layers' projections at 1 byte per weight
        plus one float32 scale per output row, the rest at ``elem``.
    """
    if mode == "none":
        return numel * elem
    h, layers = int(config.hidden_size), int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    inter = int(config.intermediate_size)
    q, k = heads * head_dim, kv * head_dim
    rows = (q + 2 * k) + h + 2 * inter + h
    linear = (h * (q + 2 * k) + q * h + 2 * h * inter + inter * h) * layers
    scale_bytes = 4
    return (numel - linear) * elem + linear + rows * layers * scale_bytes
