"""The Triton paged-attention kernel against the reference SDPA path.

Without a GPU the kernel runs on CPU under Triton's interpreter (see tests/layers/conftest.py);
on a GPU the same tests run it compiled. A compile-only test builds it for sm90 without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kubeinfer_serving.layers.attention import reference_attention, write_kv

from tests.layers.attention_cases import step_metadata

REPO = Path(__file__).resolve().parents[2]


def _run_case(mod, device, chunks, *, heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32,
              shared_prefix_blocks=0, seed=0):
    """Fill a pool (unused blocks poisoned with NaN), run kernel and reference; return both (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(s + n) // block_size) for s, n in chunks]
    num_blocks = sum(need) + 8
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    shared = perm[:shared_prefix_blocks]
    used = shared_prefix_blocks
    for nb in need:
        own = nb - len(shared) if shared_prefix_blocks else nb
        tables.append((shared if shared_prefix_blocks else []) + perm[used:used + own])
        used += own
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for t in tables:
        k_cache[t] = torch.randn((len(t), block_size, kv_heads, head_dim), generator=gen).to(dtype)
        v_cache[t] = torch.randn((len(t), block_size, kv_heads, head_dim), generator=gen).to(dtype)
    meta, num_tokens = step_metadata(chunks, tables, block_size, "cpu")
    q = torch.randn((num_tokens, heads, head_dim), generator=gen).to(dtype)
    k = torch.randn((num_tokens, kv_heads, head_dim), generator=gen).to(dtype)
    v = torch.randn((num_tokens, kv_heads, head_dim), generator=gen).to(dtype)
    # The NaN poison sits in unused blocks and in the unused tail of each sequence's last block;
    # the reference reads whole blocks, so give it a zero-filled copy of the pool.
    k_ref, v_ref = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    write_kv(k, v, k_ref, v_ref, meta.slot_mapping)
    ref = reference_attention(q.float(), k.float(), v.float(), k_ref.float(), v_ref.float(), meta, head_dim ** -0.5)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    dmeta, _ = step_metadata(chunks, tables, block_size, device)
    out = mod.paged_attention_triton(q.to(device), k_cache.to(device), v_cache.to(device), dmeta, head_dim ** -0.5)
    return out.float().cpu(), ref


@pytest.fixture
def kernel(triton_device):
    from kubeinfer_serving.layers import paged_attention_triton

    return paged_attention_triton, triton_device


def _assert_close(out, ref, dtype):
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    assert torch.isfinite(out).all(), "the kernel read a slot outside its sequence's context"
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_mixed_decode_and_prefill_rows_in_one_launch(kernel):
    mod, device = kernel
    # decode rows at several contexts, a first prefill, a chunk after cached context, a 1-token prompt
    chunks = [(19, 1), (0, 23), (40, 1), (17, 9), (0, 1), (63, 1)]
    out, ref = _run_case(mod, device, chunks)
    _assert_close(out, ref, torch.float32)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 1), (6, 2), (12, 4)])
def test_grouped_query_ratios(kernel, heads, kv_heads):
    mod, device = kernel
    out, ref = _run_case(mod, device, [(30, 1), (5, 12), (0, 7)], heads=heads, kv_heads=kv_heads)
    _assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("ctx", [15, 16, 17, 31, 32, 33])
def test_block_boundary_lengths(kernel, ctx):
    mod, device = kernel
    # decode whose context ends around a block boundary, and a prefill chunk ending there
    out, ref = _run_case(mod, device, [(ctx - 1, 1), (ctx - 5, 5), (0, ctx)])
    _assert_close(out, ref, torch.float32)


def test_prefix_cache_hit_shares_leading_blocks(kernel):
    mod, device = kernel
    # three sequences whose first two blocks are the same physical blocks (prefix-cache hits):
    # one decoding, one prefilling its uncached tail after 32 cached tokens, one mid-chunk
    out, ref = _run_case(mod, device, [(40, 1), (32, 11), (36, 6)], shared_prefix_blocks=2)
    _assert_close(out, ref, torch.float32)


def test_prefill_longer_than_one_query_tile(kernel):
    mod, device = kernel
    # 70 and 100 query tokens: several query tiles per sequence, next to decode rows
    out, ref = _run_case(mod, device, [(0, 70), (20, 100), (50, 1)], heads=2, kv_heads=2)
    _assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(kernel, dtype):
    mod, device = kernel
    out, ref = _run_case(mod, device, [(50, 1), (10, 20), (0, 9)], heads=8, kv_heads=2, head_dim=64, dtype=dtype)
    _assert_close(out, ref, dtype)


def test_head_dim_not_a_power_of_two(kernel):
    mod, device = kernel
    out, ref = _run_case(mod, device, [(21, 1), (0, 18)], head_dim=48)
    _assert_close(out, ref, torch.float32)


def test_rejects_a_block_size_the_kernel_cannot_tile():
    from kubeinfer_serving.layers.paged_attention_triton import paged_attention_triton

    meta, _ = step_metadata([(0, 3)], [[0]], 8, "cpu")
    with pytest.raises(ValueError, match="block size"):
        paged_attention_triton(torch.zeros(3, 2, 16), torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16), meta, 1.0)


_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kubeinfer_serving.layers import paged_attention_triton as mod

dtype, rows = sys.argv[1], int(sys.argv[2])
kernel = mod._paged_attention_kernel
cfg = mod.launch_config(32, 8, 128, 1 if rows == 1 else 512)
sig = {n: "*i64" for n in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr")}
sig.update({n: "*" + dtype for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "o_ptr")})
sig["scale_log2"] = "fp32"
consts = dict(cfg, BLOCK_SIZE=16, UPCAST=False, IEEE=dtype == "fp32")
for name in kernel.arg_names:
    if name.startswith("stride_"):
        sig[name] = "i32"
    elif name in consts:
        sig[name] = "constexpr"
compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32))
print(json.dumps({"cubin_bytes": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared}))
"""


@pytest.mark.parametrize(("dtype", "rows"), [("bf16", 1), ("bf16", 512), ("fp16", 1), ("fp32", 512)])
def test_compiles_for_sm90_without_a_gpu(dtype, rows):
    """The kernel compiles to an H100 cubin (catches GPU-only compile errors the interpreter misses)."""
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'serving'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE, dtype, str(rows)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["cubin_bytes"] > 1000
