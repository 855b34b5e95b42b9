"""Attention over the paged KV cache (the reference path, used on CPU and on CUDA).

The KV cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads,
head_dim]; token position p of a sequence lives in slot ``block_table[p // block_size] *
block_size + p % block_size`` (PagedAttention, Kwon et al., SOSP 2023). Each step writes the
new tokens' K/V through the slot mapping, then gathers each sequence's K/V by its slots and
runs ``torch.nn.functional.scaled_dot_product_attention``. Gathers copy whole blocks (one
index per block, not per token), so a sequence's context comes back as its blocks laid end to
end, and the masks hide the tail of its last block:

* decoding sequences (one query token) together, padded to the longest context with a key mask;
* prefill chunks one by one, causal, with the chunk's queries at the end of its context
  (so a chunk after cached or earlier-chunk tokens sees all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One sequence's multi-token chunk in the flattened batch.

    Attributes:
        q_start: index of its first token in the flattened batch.
        q_len: tokens in the chunk.
        kv_blocks: [nb] int64 block ids holding positions 0..ctx_len-1 (context + chunk).
        mask: [q_len, nb * block_size] bool (True = attend), or None when the chunk has no
            earlier context (plain causal attention over the chunk's own K/V).
    """

    q_start: int
    q_len: int
    kv_blocks: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Per-step inputs of :func:`paged_attention`, shared by all layers.

    Attributes:
        slot_mapping: [T] int64, cache slot of each token of the flattened batch.
        prefills: multi-token chunks.
        decode_idx: [Bd] int64 positions of single-token (decode) queries in the batch, or None.
        decode_block_tables: [Bd, nb] int64 block tables of the decoding sequences, padded.
        decode_mask: [Bd, 1, 1, nb * block_size] bool key mask (True = a real context position).
    """

    slot_mapping: torch.Tensor
    prefills: list[PrefillChunk]
    decode_idx: torch.Tensor | None = None
    decode_block_tables: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend each query over its sequence's context.

    Args:
        q: [T, H, D] queries (RoPE applied).
        k, v: [T, KVH, D] this step's keys (RoPE applied) and values; H % KVH == 0 (GQA).
        k_cache, v_cache: [num_blocks, block_size, KVH, D], updated in place.
        meta: see :class:`AttentionMetadata`.
        scale: softmax scale, usually head_dim ** -0.5.

    Returns:
        [T, H, D] attention output, dtype of ``q``.
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for chunk in meta.prefills:
        s, n = chunk.q_start, chunk.q_len
        qs = q[s:s + n].transpose(0, 1).unsqueeze(0)
        if chunk.mask is None:
            ks = k[s:s + n].transpose(0, 1).unsqueeze(0)
            vs = v[s:s + n].transpose(0, 1).unsqueeze(0)
        else:
            ks = k_cache[chunk.kv_blocks].view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
            vs = v_cache[chunk.kv_blocks].view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True
        )
        out[s:s + n] = o[0].transpose(0, 1)
    if meta.decode_idx is not None:
        qd = q[meta.decode_idx].unsqueeze(2)
        bd = meta.decode_block_tables.shape[0]
        kd = k_cache[meta.decode_block_tables].view(bd, -1, num_kv_heads, head_dim).permute(0, 2, 1, 3)
        vd = v_cache[meta.decode_block_tables].view(bd, -1, num_kv_heads, head_dim).permute(0, 2, 1, 3)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[meta.decode_idx] = o[:, :, 0]
    return out
