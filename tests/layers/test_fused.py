"""The fused Triton kernels (residual add + RMSNorm, SiLU * mul) against the eager reference."""

from __future__ import annotations

import pytest
import torch
from kubeinfer_serving.layers import activation_norm


@pytest.fixture
def fused(triton_device):
    from kubeinfer_serving.layers import fused

    return fused, triton_device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_add_rms_norm_matches_the_reference(fused, dtype, hidden):
    mod, device = fused
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, hidden, generator=g).to(dtype)
    res = torch.randn(5, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    out, new_res = mod.add_rms_norm(x.to(device), w.to(device), 1e-5, res.to(device))
    # exact but for the last bit in bf16 (the interpreter's float32 -> bf16 cast truncates)
    torch.testing.assert_close(new_res.cpu().float(), (x + res).float(), atol=0, rtol=8e-3 if dtype == torch.bfloat16 else 0)
    torch.testing.assert_close(out.cpu().float(), activation_norm.rms_norm_reference(x + res, w, 1e-5).float(),
                               atol=tol, rtol=tol)
    out, same = mod.add_rms_norm(x.to(device), w.to(device), 1e-5)
    torch.testing.assert_close(out.cpu().float(), activation_norm.rms_norm_reference(x, w, 1e-5).float(),
                               atol=tol, rtol=tol)
    assert torch.equal(same.cpu(), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [48, 1500])
def test_silu_and_mul_matches_the_reference(fused, dtype, inter):
    mod, device = fused
    x = torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = x.float().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(mod.silu_and_mul(x.to(device)).cpu().float(), expected, atol=tol, rtol=tol)


_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kubeinfer_serving.layers import fused

t = GPUTarget("cuda", 90, 32)
sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
       "n_cols": "i32", "eps": "fp32", "HAS_RESIDUAL": "constexpr", "BLOCK": "constexpr"}
a = triton.compile(ASTSource(fused._add_rms_norm_kernel, sig, {"HAS_RESIDUAL": True, "BLOCK": 2048}), target=t)
sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "n_cols": "i32", "BLOCK": "constexpr"}
b = triton.compile(ASTSource(fused._silu_and_mul_kernel, sig, {"BLOCK": 1024}), target=t)
print(len(a.asm["cubin"]), len(b.asm["cubin"]))
"""


def test_fused_kernels_compile_for_sm90_without_a_gpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{repo / 'serving'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(int(n) > 1000 for n in proc.stdout.split())
