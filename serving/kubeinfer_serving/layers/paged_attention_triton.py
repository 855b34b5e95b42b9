"""Varlen paged attention in Triton: one launch for all decode rows and prefill chunks of a step.

Reads K/V in place through the block table (no gather, no padding to the longest context),
grouped-query aware, softmax in float32 with the online (streaming) formulation of Milakov &
Gimelshein 2018 as used by FlashAttention (Dao et al. 2022). The cache layout and the
packing of a KV head's query heads into the rows of one tile follow the design of vLLM's
``triton_unified_attention`` (read for the design; this is our own kernel).

Grid: (sequences, query tiles of the longest query run, KV heads). A program takes
``BLOCK_Q`` consecutive query tokens of one sequence times the ``GROUP`` query heads that
share one KV head, so a tile has ``BLOCK_Q * GROUP_PAD`` rows (at least 16, the smallest
``tl.dot``); programs whose tile starts past their sequence's query run exit at once (for a
decode-only step the grid is (B, 1, KVH) and nothing exits). It walks the sequence's KV
blocks one page at a time up to the tile's last query position, masking keys after each
query's position (causal, so a chunk after cached context sees all of it).

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (tests); there bf16 operands of
``tl.dot`` are upcast to float32 because the interpreter stores bf16 as uint16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .attention import AttentionMetadata

#: Rows of a decode tile / a prefill tile (query tokens x query heads per KV head).
DECODE_TILE_ROWS = 16
PREFILL_TILE_ROWS = 64


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, o_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_before = seq_len - q_len
        ROWS: tl.constexpr = BLOCK_Q * GROUP_PAD
        offs_m = tl.arange(0, ROWS)
        q_local = q_tile * BLOCK_Q + offs_m // GROUP_PAD
        head_in_group = offs_m % GROUP_PAD
        row_valid = (q_local < q_len) & (head_in_group < GROUP)
        token = (q_start + q_local).to(tl.int64)
        head = kv_head * GROUP + head_in_group
        q_pos = ctx_before + q_local
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_valid = offs_d < HEAD_DIM
        q = tl.load(
            q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_valid[:, None] & d_valid[None, :], other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)
        last_local = tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
        num_pages = tl.cdiv(ctx_before + last_local + 1, BLOCK_SIZE)
        offs_s = tl.arange(0, BLOCK_SIZE)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for page in range(0, num_pages):
            block = tl.load(bt_row + page).to(tl.int64)
            k = tl.load(
                k_cache_ptr + block * stride_kb + offs_s[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                mask=d_valid[None, :], other=0.0,
            )
            v = tl.load(
                v_cache_ptr + block * stride_vb + offs_s[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
                mask=d_valid[None, :], other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale_log2
            k_pos = page * BLOCK_SIZE + offs_s
            s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(
            o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            acc.to(o_ptr.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )


def launch_config(num_heads: int, num_kv_heads: int, head_dim: int, max_query_len: int) -> dict[str, int]:
    """Compile-time parameters of the kernel for one step's shapes.

    Returns:
        dict of GROUP, GROUP_PAD, BLOCK_Q, HEAD_DIM, HEAD_DIM_PAD (all ints).

    Raises:
        ValueError: ``num_heads`` is not a multiple of ``num_kv_heads``.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    rows = DECODE_TILE_ROWS if max_query_len <= 1 else PREFILL_TILE_ROWS
    block_q = max(1, rows // group_pad)
    return {"GROUP": group, "GROUP_PAD": group_pad, "BLOCK_Q": block_q,
            "HEAD_DIM": head_dim, "HEAD_DIM_PAD": max(16, triton.next_power_of_2(head_dim))}


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend every query of the step over its sequence's cached context in one kernel launch.

    The cache must already hold this step's K/V (see
    :func:`kubeinfer_serving.layers.attention.write_kv`).

    Args:
        q: [T, H, D] queries, fp32/fp16/bf16, last dim contiguous.
        k_cache, v_cache: [num_blocks, block_size, KVH, D], same dtype, last dim contiguous;
            block_size a power of two >= 16.
        meta: ``query_start_loc`` [B+1], ``seq_lens`` [B], ``block_tables`` [B, max_blocks]
            (int32 or int64) on ``q.device``; ``max_query_len`` host int.
        scale: softmax scale.
        out: optional [T, H, D] output buffer.

    Returns:
        [T, H, D] output in ``q.dtype`` (fp32 accumulation).

    Raises:
        ValueError: unsupported shapes (block size, head counts).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two block size >= 16, got {block_size}")
    cfg = launch_config(num_heads, num_kv_heads, head_dim, meta.max_query_len)
    if out is None:
        out = torch.empty_like(q)
    batch = meta.seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    grid = (batch, triton.cdiv(meta.max_query_len, cfg["BLOCK_Q"]), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out,
        meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.block_tables.stride(0),
        BLOCK_SIZE=block_size,
        UPCAST=interpret and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
        **cfg,
    )
    return out
