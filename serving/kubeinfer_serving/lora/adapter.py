"""A LoRA adapter held in host memory, and the modules of our Llama it can target.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds to a linear
layer ``y = x W^T`` the low-rank update ``scaling * (x A^T) B^T`` with A [r, in] and B [out, r].
``scaling`` is PEFT's: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski
2023), per module after PEFT's ``alpha_pattern``. Here B is stored already multiplied by it.

Our model stacks q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``
(:mod:`kubeinfer_serving.models.llama`): a checkpoint module maps to a (stacked module, slice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: Checkpoint (Hugging Face / PEFT) module name -> (our stacked module, slice index in it).
TARGET_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}
#: Our stacked modules in a fixed order.
STACKED_MODULES = ("qkv", "o", "gate_up", "down")


class AdapterLoadError(Exception):
    """An adapter cannot be used with this base model; the message says why (shown to users)."""


@dataclass(frozen=True)
class ModuleShape:
    """One stacked module's shape: ``in_features`` and the output rows of each slice, in order."""

    in_features: int
    slice_sizes: tuple[int, ...]

    @property
    def out_features(self) -> int:
        """Output features of the stacked module (sum of the slices)."""
        return sum(self.slice_sizes)

    def slice_offset(self, index: int) -> int:
        """First output row of slice ``index``."""
        return sum(self.slice_sizes[:index])


@dataclass(frozen=True)
class LoRAShapes:
    """The targetable modules of one base model: layer count and each stacked module's shape."""

    num_layers: int
    modules: dict[str, ModuleShape]

    @classmethod
    def from_hf_config(cls, config: Any) -> LoRAShapes:
        """Shapes of :class:`~kubeinfer_serving.models.llama.LlamaForCausalLM` for a Hugging Face config."""
        h = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or h // heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim
        inter = int(config.intermediate_size)
        return cls(int(config.num_hidden_layers), {
            "qkv": ModuleShape(h, (heads * head_dim, kv, kv)),
            "o": ModuleShape(heads * head_dim, (h,)),
            "gate_up": ModuleShape(h, (inter, inter)),
            "down": ModuleShape(inter, (h,)),
        })

    def target_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a checkpoint module such as ``q_proj``."""
        stacked, index = TARGET_MODULES[target]
        shape = self.modules[stacked]
        return shape.in_features, shape.slice_sizes[index]


@dataclass(eq=False)
class LoRAAdapter:
    """An adapter's weights in host memory, checked against one base model's shapes.

    Attributes:
        name: its OpenAI model id.
        digest: SHA-256 of its weights file and config: the identity mixed into the prefix
            cache's block hashes (two adapters never share KV blocks; one adapter reloaded does).
        rank: the largest rank among its modules.
        weights: (layer, checkpoint module e.g. ``q_proj``) -> (A [r, in], B [out, r] times the
            module's scaling), float32 on the host.
        source: where it was loaded from (for display).
    """

    name: str
    digest: bytes
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    source: str = ""

    @property
    def nbytes(self) -> int:
        """Host bytes of the weights."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    @property
    def targets(self) -> list[str]:
        """The checkpoint modules it adapts, sorted."""
        return sorted({m for _, m in self.weights})
