"""LoRA shrink and expand in Triton: every row of a step with its own adapter slot, one launch each.

The two halves of a LoRA update ``y += (x A^T) B^T`` over the slot pool of :mod:`.slots`:

* **shrink**: ``s[t] = A[slot[t]] x[t]``, x [T, in], A [S, n R, in] -> s [T, n R] float32;
* **expand**: ``y[t, o] += sum_r s[t, i(o) R + r] B[slot[t], o, r]`` where ``i(o)`` is the slice
  (q, k or v of a stacked ``qkv``) holding output column ``o``; B [S, out, R], y [T, out].

Rows whose slot is -1 (the base model) are skipped. This is the per-row gather-matmul-vector
form of punica's BGMV kernels (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving") and of
vLLM's ``lora_shrink`` / ``lora_expand`` (read for the design; this is our own kernel): one
program per (row, block of output features), accumulating in float32. The slot indexes are a
device tensor, so a captured CUDA graph can replay with new ones.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Output features per program (shrink: rank columns; expand: output columns) and the input chunk.
BLOCK_N = 32
BLOCK_K = 64


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, slots_ptr, IN, NR,
                   stride_xt, stride_as, stride_an, stride_st,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    nb = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NR
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < IN
            x = tl.load(x_ptr + t * stride_xt + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot.to(tl.int64) * stride_as + offs_n[:, None] * stride_an + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(s_ptr + t * stride_st + offs_n, acc, mask=n_ok)


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, slots_ptr, OUT, R, START1, START2,
                   stride_st, stride_bs, stride_bo, stride_yt,
                   R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    nb = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        offs_o = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ok = offs_o < OUT
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        piece = (offs_o >= START1).to(tl.int32) + (offs_o >= START2).to(tl.int32)  # slice of each column
        s = tl.load(s_ptr + t * stride_st + piece[:, None] * R + offs_r[None, :],
                    mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_o[:, None] * stride_bo + offs_r[None, :],
                    mask=o_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(s * b, axis=1)
        y_ptrs = y_ptr + t * stride_yt + offs_o
        y = tl.load(y_ptrs, mask=o_ok, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=o_ok)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
    """``s[t] = a[row_slots[t]] @ x[t]`` for rows with a slot (others: 0).

    Args:
        x: [T, in] (contiguous rows); a: [S, NR, in] contiguous; row_slots: [T] int32/int64, -1 = none.

    Returns:
        [T, NR] float32.
    """
    t, in_features = x.shape
    nr = a.shape[1]
    s = torch.zeros((t, nr), dtype=torch.float32, device=x.device)
    if t == 0:
        return s
    x = x.contiguous()
    _shrink_kernel[(t, triton.cdiv(nr, BLOCK_N))](
        x, a, s, row_slots, in_features, nr, x.stride(0), a.stride(0), a.stride(1), s.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return s


def lora_expand(s: torch.Tensor, b: torch.Tensor, y: torch.Tensor, row_slots: torch.Tensor,
                slice_sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    """``y[t, o] += sum_r s[t, i(o) rank + r] * b[row_slots[t], o, r]`` in place (see the module docstring).

    Args:
        s: [T, len(slice_sizes) * rank] float32 from :func:`lora_shrink`; b: [S, out, rank]
        contiguous; y: [T, out] with unit column stride; row_slots: [T], -1 = none;
        slice_sizes: output columns of each slice (1 to 3 slices), summing to out.

    Returns:
        ``y``.
    """
    if not 1 <= len(slice_sizes) <= 3:
        raise ValueError(f"1 to 3 slices are supported, got {len(slice_sizes)}")
    t, out = y.shape
    if t == 0:
        return y
    bounds = [sum(slice_sizes[:i + 1]) for i in range(len(slice_sizes) - 1)] + [out, out]
    _expand_kernel[(t, triton.cdiv(out, BLOCK_N))](
        s, b, y, row_slots, out, rank, bounds[0], bounds[1], s.stride(0), b.stride(0), b.stride(1), y.stride(0),
        R_PAD=triton.next_power_of_2(rank), BLOCK_N=BLOCK_N)
    return y
