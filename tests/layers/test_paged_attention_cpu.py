"""The ``cpu`` attention backend (decode rows through the Numba kernel that reads the paged cache in
place) against a hand-written softmax attention, and its dispatch."""

from __future__ import annotations

import pytest
import torch
from kubeinfer_serving.layers import attention as attn
from kubeinfer_serving.layers import paged_attention_cpu
from kubeinfer_serving.layers.attention import attention_backend, cpu_attention, paged_attention

from tests.layers.attention_cases import pool_case


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_rows_match_naive_attention_across_gqa_ratios_and_block_boundaries(heads, kv_heads, block_size):
    # Contexts at, just before and just after block boundaries, one token, and long ones.
    ctx = (1, 2, block_size - 1, block_size, block_size + 1, 2 * block_size, 3 * block_size - 1, 97, 300)
    out, expected, meta = pool_case(cpu_attention, [(c - 1, 1) for c in ctx], heads=heads, kv_heads=kv_heads,
                                    head_dim=64, block_size=block_size, seed=heads + block_size)
    assert meta.cpu_plan().decode_rows.q_rows.size == len(ctx) - 1  # a 1-token context is a prefill row
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_never_reads_outside_a_context():
    # NaN everywhere but the sequences' tokens: the tail of each last block and the free blocks.
    out, expected, _ = pool_case(cpu_attention, [(c - 1, 1) for c in (5, 17, 33, 64)], block_size=16,
                                 poison=float("nan"))
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_mixed_step_prefill_chunks_with_and_without_context_and_decode_rows():
    chunks = [(0, 7), (40, 1), (9, 12), (3, 1), (0, 1), (100, 1), (33, 5)]
    out, expected, _ = pool_case(cpu_attention, chunks, heads=6, kv_heads=2, head_dim=8, block_size=8, seed=3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_backend_dispatch(monkeypatch, one_thread):
    cpu = torch.device("cpu")
    monkeypatch.delenv(attn.BACKEND_ENV, raising=False)
    assert attention_backend(cpu, torch.float32) == "cpu"
    assert attention_backend(cpu, torch.bfloat16) == "reference"
    torch.set_num_threads(2)  # the reference's gather + SDPA run multi-threaded: faster than the kernel
    assert attention_backend(cpu, torch.float32) == "reference"
    torch.set_num_threads(1)
    monkeypatch.setenv(attn.BACKEND_ENV, "reference")
    assert attention_backend(cpu, torch.float32) == "reference"
    monkeypatch.setenv(attn.BACKEND_ENV, "triton")
    assert attention_backend(cpu, torch.float32) == "triton"


def test_paged_attention_on_cpu_float32_with_one_thread_runs_the_kernel(monkeypatch, one_thread):
    monkeypatch.delenv(attn.BACKEND_ENV, raising=False)
    calls = []
    real = paged_attention_cpu.decode_attention_cpu
    monkeypatch.setattr(paged_attention_cpu, "decode_attention_cpu", lambda *a: calls.append(a) or real(*a))

    def attend(q, k, v, k_cache, v_cache, meta, scale):
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale)

    out, expected, _ = pool_case(attend, [(c - 1, 1) for c in (9, 40)])
    assert len(calls) == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
