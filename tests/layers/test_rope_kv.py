"""The Triton RoPE + KV-store kernel against the eager rotation and ``write_kv``.

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py); a compile-only
test builds it for sm90. Unused cache slots hold NaN, so a store at a wrong slot, or a missing
one, shows up as a NaN mismatch anywhere in the pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kubeinfer_serving.layers.attention import write_kv
from kubeinfer_serving.layers.rotary import apply_rope
from kubeinfer_serving.models.llama import rope_inv_freq
from transformers import LlamaConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def kernel(triton_device):
    from kubeinfer_serving.layers import rope_kv_triton

    return rope_kv_triton, triton_device


def _tables(head_dim: int, max_pos: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of Llama 3's scaled RoPE (scale 1) as the model builds them."""
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    inv_freq, scale = rope_inv_freq(cfg)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def _case(heads, kv_heads, head_dim, dtype, slots, positions, block_size=16, num_blocks=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = len(slots)
    qkv = torch.randn((t, (heads + 2 * kv_heads) * head_dim), generator=gen).to(dtype)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return (qkv, torch.tensor(positions, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64),
            torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype))


def _reference(qkv, positions, slots, k_cache, v_cache, cos_t, sin_t, heads, kv_heads, head_dim, compute_dtype):
    """Eager rotation in ``compute_dtype`` (float32: one rounding, as the kernel), then write_kv."""
    t = qkv.shape[0]
    q, k, v = qkv.to(compute_dtype).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    cos = cos_t[positions].to(compute_dtype).unsqueeze(1)
    sin = sin_t[positions].to(compute_dtype).unsqueeze(1)
    q = apply_rope(q.reshape(t, heads, head_dim), cos, sin).to(qkv.dtype)
    k = apply_rope(k.reshape(t, kv_heads, head_dim), cos, sin).to(qkv.dtype)
    v = v.reshape(t, kv_heads, head_dim).to(qkv.dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    write_kv(k[keep], v[keep], k_ref, v_ref, slots[keep])
    return q, k_ref, v_ref


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 32), (6, 2, 48), (8, 1, 64), (4, 4, 16)])
def test_rotates_q_and_k_and_stores_at_the_slots(kernel, heads, kv_heads, head_dim):
    mod, device = kernel
    cos_t, sin_t = _tables(head_dim)
    # scattered slots over several blocks, positions far apart (large angles), one padded row (-1)
    slots = [17, 3, 94, 40, -1, 41, 0]
    positions = [5, 0, 299, 130, 7, 131, 64]
    qkv, pos, sl, kc, vc = _case(heads, kv_heads, head_dim, torch.float32, slots, positions)
    q_ref, k_ref, v_ref = _reference(qkv, pos, sl, kc, vc, cos_t, sin_t, heads, kv_heads, head_dim, torch.float32)
    kd, vd = kc.to(device), vc.to(device)
    q = mod.rope_kv_store(qkv.to(device), pos.to(device), cos_t.to(device), sin_t.to(device), kd, vd,
                          sl.to(device), heads, kv_heads, head_dim)
    torch.testing.assert_close(q.cpu(), q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kd.cpu(), k_ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(vd.cpu().nan_to_num(7.0), v_ref.nan_to_num(7.0)), "values are copied bit for bit"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounds_once_from_float32(kernel, dtype):
    mod, device = kernel
    heads, kv_heads, head_dim = 8, 2, 64
    cos_t, sin_t = _tables(head_dim)
    slots, positions = [33, 2, 80], [33, 2, 250]
    qkv, pos, sl, kc, vc = _case(heads, kv_heads, head_dim, dtype, slots, positions, seed=1)
    kd, vd = kc.to(device), vc.to(device)
    q = mod.rope_kv_store(qkv.to(device), pos.to(device), cos_t.to(device), sin_t.to(device), kd, vd,
                          sl.to(device), heads, kv_heads, head_dim)
    # Against the float32 rotation rounded once: at most one rounding step apart.
    q_ref, k_ref, v_ref = _reference(qkv, pos, sl, kc, vc, cos_t, sin_t, heads, kv_heads, head_dim, torch.float32)
    ulp = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(q.cpu().float(), q_ref.float(), atol=ulp * 4, rtol=ulp)
    torch.testing.assert_close(kd.cpu().float(), k_ref.float(), atol=ulp * 4, rtol=ulp, equal_nan=True)
    assert torch.equal(vd.cpu().float().nan_to_num(7.0), v_ref.float().nan_to_num(7.0))
    # And close to the model's eager path in the half dtype (which rounds after every op).
    q_eager, _, _ = _reference(qkv, pos, sl, kc, vc, cos_t, sin_t, heads, kv_heads, head_dim, dtype)
    torch.testing.assert_close(q.cpu().float(), q_eager.float(), atol=0.05, rtol=0.02)


def test_rejects_an_odd_head_dim_and_a_wrong_qkv_width():
    from kubeinfer_serving.layers.rope_kv_triton import rope_kv_store

    cache = torch.zeros(1, 16, 1, 5)
    with pytest.raises(ValueError, match="even head dim"):
        rope_kv_store(torch.zeros(1, 15), torch.zeros(1, dtype=torch.int64), torch.zeros(4, 5), torch.zeros(4, 5),
                      cache, cache, torch.zeros(1, dtype=torch.int64), 1, 1, 5)
    cache = torch.zeros(1, 16, 1, 4)
    with pytest.raises(ValueError, match="qkv width"):
        rope_kv_store(torch.zeros(1, 20), torch.zeros(1, dtype=torch.int64), torch.zeros(4, 4), torch.zeros(4, 4),
                      cache, cache, torch.zeros(1, dtype=torch.int64), 2, 1, 4)


_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kubeinfer_serving.layers import rope_kv_triton as mod

kernel = mod._rope_kv_store_kernel
sig = {"qkv_ptr": "*bf16", "q_out_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64",
       "slot_ptr": "*i64", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16"}
consts = {"NUM_HEADS": 32, "NUM_KV_HEADS": 8, "HEADS_PAD": 32, "KV_HEADS_PAD": 8, "HEAD_DIM": 64, "HALF": 32,
          "HALF_PAD": 32, "BLOCK_SIZE": 16}
for name in kernel.arg_names:
    if name.startswith("stride_"):
        sig[name] = "i32"
    elif name in consts:
        sig[name] = "constexpr"
print(len(triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32)).asm["cubin"]))
"""


def test_compiles_for_sm90_without_a_gpu():
    """Llama-3.2-1B shapes (32 heads, 8 KV heads, head dim 64), bf16: an H100 cubin builds."""
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'serving'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 1000
