"""Rotary position embeddings applied with the KV store, then paged attention: one entry point for
the model's attention, with backend dispatch.

* Eager (CPU, and the test oracle): split the merged qkv projection, rotate q and k with
  Hugging Face's ``q * cos + rotate_half(q) * sin`` in the model dtype (so float32 greedy
  decoding matches Hugging Face token for token), then
  :func:`kubeinfer_serving.layers.attention.paged_attention` (KV store + attention).
* Fused (CUDA with the Triton attention backend): one
  :func:`kubeinfer_serving.layers.rope_kv_triton.rope_kv_store` launch rotates q/k and writes
  k/v into the cache, then the Triton paged-attention kernel reads the cache. No per-step cos/sin
  gather: the kernel indexes the float32 tables by position.

The fused path runs when :func:`~kubeinfer_serving.layers.attention.use_triton` and
:func:`~kubeinfer_serving.layers.activation_norm.use_fused` both hold for the device (both
default to CUDA; ``KUBEINFER_FUSED_KERNELS=0`` or ``KUBEINFER_ATTENTION_BACKEND=reference`` turn
it off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .activation_norm import use_fused
from .attention import AttentionMetadata, paged_attention, use_triton


@dataclass
class RotaryInputs:
    """A step's rotary inputs, built once per forward by :func:`rotary_inputs`, shared by all layers.

    Attributes:
        positions: [T] int64 token positions.
        cos_cache, sin_cache: [max_positions, D] float32 tables.
        cos, sin: [T, 1, D] per-token rows in the model dtype (eager path), or None (fused path).
    """

    positions: torch.Tensor
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @property
    def fused(self) -> bool:
        """True when the Triton RoPE + KV-store kernel runs (no per-token rows were gathered)."""
        return self.cos is None


def rotary_inputs(positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                  dtype: torch.dtype) -> RotaryInputs:
    """The step's :class:`RotaryInputs`: per-token cos/sin rows on the eager path, the tables alone when fused."""
    if use_triton(positions.device) and use_fused(positions.device):
        return RotaryInputs(positions, cos_cache, sin_cache)
    cos = cos_cache.index_select(0, positions).to(dtype).unsqueeze(1)
    sin = sin_cache.index_select(0, positions).to(dtype).unsqueeze(1)
    return RotaryInputs(positions, cos_cache, sin_cache, cos, sin)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: ``cat(-x[..., D/2:], x[..., :D/2])`` (the neox / Hugging Face form)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotation: x [T, heads, D], cos/sin [T, 1, D] in x's dtype -> [T, heads, D]."""
    return x * cos + rotate_half(x) * sin


def rope_paged_attention(
    qkv: torch.Tensor,
    rope: RotaryInputs,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
) -> torch.Tensor:
    """Rotate q/k, store this step's k/v in the cache, attend.

    Args:
        qkv: [T, (H + 2 * KVH) * D] merged projection output (q heads, k heads, v heads).
        rope: from :func:`rotary_inputs`.
        kv_cache: (k_cache, v_cache), each [num_blocks, block_size, KVH, D], updated in place.
        meta: the step's attention metadata.
        num_heads, num_kv_heads, head_dim: H, KVH, D.
        scale: softmax scale.

    Returns:
        [T, H, D] attention output in ``qkv.dtype``.
    """
    t = qkv.shape[0]
    if rope.fused:
        from .paged_attention_triton import paged_attention_triton
        from .rope_kv_triton import rope_kv_store

        q = rope_kv_store(qkv.contiguous(), rope.positions, rope.cos_cache, rope.sin_cache, kv_cache[0],
                          kv_cache[1], meta.slot_mapping, num_heads, num_kv_heads, head_dim)
        return paged_attention_triton(q, kv_cache[0], kv_cache[1], meta, scale)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
    # q and k heads rotate together (one set of elementwise ops instead of two; same values).
    q, k = apply_rope(qk.view(t, num_heads + num_kv_heads, head_dim), rope.cos, rope.sin).split(
        [num_heads, num_kv_heads], dim=1)
    return paged_attention(q, k, v.view(t, num_kv_heads, head_dim), kv_cache[0], kv_cache[1], meta, scale)
