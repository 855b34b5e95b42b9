"""RoPE applied with the KV store, in Triton: one launch per layer rotates q and k and writes k/v
into the paged KV cache through the slot mapping.

Replaces, per layer, the eager split of the qkv projection, the two rotations (about ten
elementwise kernels: mul, slice, neg, cat, mul, add for q and for k) and the two ``index_copy_``
of the KV store with one kernel, as vLLM's ``rotary_embedding`` + ``reshape_and_cache`` pair
does in two. The rotation is the "neox" (rotate-half) form that Llama uses (Su et al. 2021 as
implemented by GPT-NeoX and Hugging Face ``apply_rotary_pos_emb``)::

    out[:D/2] = x[:D/2] * cos[:D/2] - x[D/2:] * sin[:D/2]
    out[D/2:] = x[D/2:] * cos[D/2:] + x[:D/2] * sin[D/2:]

computed in float32 from the float32 cos/sin tables and rounded once to the model dtype.

Grid: one program per token. It loads the token's position and slot, rotates all query heads
(a [heads, D/2] tile per half), rotates all KV heads' keys and stores them with the values at
``block = slot // block_size``, ``offset = slot % block_size``. A negative slot skips the store
(padded rows). The eager path (:func:`kubeinfer_serving.layers.rotary.apply_rope` +
:func:`kubeinfer_serving.layers.attention.write_kv`) is the CPU path and the test oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kv_store_kernel(
    qkv_ptr, q_out_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_qkv_t, stride_qo_t, stride_qo_h, stride_cos,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF_PAD)
    d_ok = offs < HALF
    cos1 = tl.load(cos_ptr + pos * stride_cos + offs, mask=d_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + pos * stride_cos + HALF + offs, mask=d_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * stride_cos + offs, mask=d_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + pos * stride_cos + HALF + offs, mask=d_ok, other=0.0).to(tl.float32)
    row = qkv_ptr + t * stride_qkv_t

    # Queries: [HEADS_PAD, HALF_PAD] tiles of the two halves of every head.
    h = tl.arange(0, HEADS_PAD)
    qm = (h < NUM_HEADS)[:, None] & d_ok[None, :]
    src = row + h[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(src, mask=qm, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=qm, other=0.0).to(tl.float32)
    dst = q_out_ptr + t * stride_qo_t + h[:, None] * stride_qo_h + offs[None, :]
    out_ty = q_out_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(out_ty), mask=qm)
    tl.store(dst + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(out_ty), mask=qm)

    # Keys (rotated) and values (copied) into the cache slot.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        g = tl.arange(0, KV_HEADS_PAD)
        km = (g < NUM_KV_HEADS)[:, None] & d_ok[None, :]
        ksrc = row + NUM_HEADS * HEAD_DIM + g[:, None] * HEAD_DIM + offs[None, :]
        k1 = tl.load(ksrc, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(ksrc + HALF, mask=km, other=0.0).to(tl.float32)
        kdst = k_cache_ptr + block * stride_kb + off * stride_ks + g[:, None] * stride_kh + offs[None, :]
        kv_ty = k_cache_ptr.dtype.element_ty
        tl.store(kdst, (k1 * cos1[None, :] - k2 * sin1[None, :]).to(kv_ty), mask=km)
        tl.store(kdst + HALF, (k2 * cos2[None, :] + k1 * sin2[None, :]).to(kv_ty), mask=km)
        vsrc = row + (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM + g[:, None] * HEAD_DIM + offs[None, :]
        vdst = v_cache_ptr + block * stride_vb + off * stride_vs + g[:, None] * stride_vh + offs[None, :]
        tl.store(vdst, tl.load(vsrc, mask=km, other=0.0), mask=km)
        tl.store(vdst + HALF, tl.load(vsrc + HALF, mask=km, other=0.0), mask=km)


def rope_kv_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Rotate q and k by their positions and store k/v into the paged cache, in one launch.

    Args:
        qkv: [T, (H + 2 * KVH) * D] the merged q/k/v projection (q heads, then k, then v),
            fp32/fp16/bf16, last dim contiguous.
        positions: [T] int64 (or int32) position of each token.
        cos_cache, sin_cache: [max_positions, D] float32 tables (``cat(freqs, freqs)`` cos/sin,
            times the RoPE variant's scale), last dim contiguous.
        k_cache, v_cache: [num_blocks, block_size, KVH, D] in ``qkv.dtype``, last dim
            contiguous; updated in place.
        slot_mapping: [T] int64 cache slot per token; a negative slot skips that token's store.
        num_heads, num_kv_heads, head_dim: H, KVH, D (D even).

    Returns:
        [T, H, D] rotated queries in ``qkv.dtype`` (contiguous).

    Raises:
        ValueError: odd head dim, or a ``qkv`` width that is not (H + 2 * KVH) * D.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    num_tokens, width = qkv.shape
    if width != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv width {width} != (heads {num_heads} + 2 * kv heads {num_kv_heads}) * {head_dim}")
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    half = head_dim // 2
    _rope_kv_store_kernel[(num_tokens,)](
        qkv, q, cos_cache, sin_cache, positions, slot_mapping, k_cache, v_cache,
        qkv.stride(0), q.stride(0), q.stride(1), cos_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_heads), KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HALF=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_SIZE=k_cache.shape[1],
    )
    return q
