"""Fused elementwise kernels for CUDA (Triton): residual add + RMSNorm, and SiLU(gate) * up.

Each replaces several eager kernels (add, cast, pow, mean, rsqrt, mul, cast, mul for the norm;
silu and mul for the MLP) with one, as vLLM's ``fused_add_rms_norm`` and ``silu_and_mul`` do.
The math is the same as the eager reference in :mod:`kubeinfer_serving.layers.activation_norm`: RMSNorm in
float32 (Zhang & Sennrich 2019, computed like Hugging Face: normalise in fp32, cast to the input
dtype, then scale by the weight), SiLU in float32. On CPU the model keeps the eager ops (they are
the Hugging Face equality reference); tests run these kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    dtype = x.dtype
    # Elementwise math in float32, rounded to the input dtype where eager torch rounds (after the
    # add, after the normalisation, after the weight product), so results equal the eager ops.
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    normed = (h * (1.0 / tl.sqrt(var + eps))).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (or ``x``), then ``weight * rmsnorm(r)``, in one kernel.

    Args:
        x: [T, hidden] contiguous, fp32/fp16/bf16.
        weight: [hidden], same dtype.
        eps: added to the mean square.
        residual: [T, hidden] like ``x``, or None.

    Returns:
        (normalised [T, hidden] in ``x.dtype``, the new residual ``r``).
    """
    rows, cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, res_out, cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(cols),
        )
    return out, res_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` in one kernel (float32 inside).

    Args:
        x: [T, 2 * I] contiguous (the merged gate/up projection's output).

    Returns:
        [T, I] in ``x.dtype``.
    """
    rows, width = x.shape
    n = width // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, BLOCK=block)
    return out
