"""The KV pool sizing rule (a pure function) and, on CUDA, the profiling step that feeds it."""

from __future__ import annotations

import pytest
import torch
from kubeinfer_serving.engine.kv_sizing import KVPoolSizeError, profile_activation_peak, size_kv_pool

MiB = 1 << 20
BLOCK = 64 * 1024


def size(**kw):
    args = dict(budget_bytes=1000 * MiB, weights_bytes=300 * MiB, activation_bytes=100 * MiB, others_bytes=200 * MiB,
                block_bytes=BLOCK, max_blocks=1 << 20)
    return size_kv_pool(**{**args, **kw})


def test_auto_pool_takes_what_is_left_after_others_weights_and_activation() -> None:
    s = size()
    assert s.rule == "auto" and s.available_bytes == 400 * MiB
    assert s.num_blocks == 400 * MiB // BLOCK and s.kv_bytes == s.num_blocks * BLOCK
    assert s.reserved_bytes == 300 * MiB + 100 * MiB + 400 * MiB


def test_auto_pool_is_shared_with_the_auto_models_still_to_come() -> None:
    assert size(share=4).num_blocks == 100 * MiB // BLOCK


def test_auto_pool_without_a_measured_peak_takes_the_fallback_capped_by_what_is_left() -> None:
    cpu = size(activation_bytes=None, fallback_bytes=256 * MiB)
    assert cpu.rule == "auto-cpu" and cpu.num_blocks == 256 * MiB // BLOCK  # 500 MiB left, 256 wanted
    tight = size(activation_bytes=None, fallback_bytes=256 * MiB, budget_bytes=600 * MiB)
    assert tight.num_blocks == 100 * MiB // BLOCK  # only 100 MiB left: takes that, does not fail


def test_asked_sizes_are_honoured_rounded_down_to_blocks() -> None:
    assert size(requested_bytes=10 * MiB + 5).num_blocks == 160
    frac = size(fraction=0.25)
    assert frac.rule == "kvCacheFraction" and frac.kv_bytes == 250 * MiB


def test_every_pool_is_capped_at_what_max_num_seqs_sequences_can_use() -> None:
    for kw in ({}, {"requested_bytes": 100 * MiB}, {"fraction": 0.1}):
        s = size(max_blocks=7, **kw)
        assert s.num_blocks == 7 and s.capped


def test_an_asked_pool_that_does_not_fit_fails_naming_the_numbers() -> None:
    with pytest.raises(KVPoolSizeError) as err:
        size(requested_bytes=500 * MiB, name="'llama'")
    msg = str(err.value)
    for part in ("'llama'", "kvCacheBytes", "budget 1000.00 MiB", "other models 200.00 MiB", "weights 300.00 MiB",
                 "activation peak 100.00 MiB", "leaves 400.00 MiB"):
        assert part in msg
    with pytest.raises(KVPoolSizeError, match="kvCacheFraction"):
        size(fraction=0.5)


def test_nothing_left_for_an_auto_pool_fails_naming_the_numbers() -> None:
    with pytest.raises(KVPoolSizeError) as err:
        size(budget_bytes=600 * MiB + BLOCK - 1)
    assert "no memory left for the KV pool" in str(err.value) and "one KV block needs 65536 B" in str(err.value)
    with pytest.raises(KVPoolSizeError, match="budget 400.00 MiB.*leaves -100.00 MiB"):
        size(budget_bytes=400 * MiB, activation_bytes=None, fallback_bytes=256 * MiB)


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        size(requested_bytes=MiB, fraction=0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            size(fraction=bad)


def test_describe_is_one_line_with_the_arithmetic() -> None:
    line = size(activation_bytes=None, fallback_bytes=256 * MiB).describe("'tiny-llama'")
    assert "\n" not in line
    assert line.startswith("KV pool of 'tiny-llama': 4096 blocks x 65536 B = 256.00 MiB")
    assert "activation peak not measured (cpu, counted as 0)" in line


def test_the_activation_peak_is_not_measured_on_cpu() -> None:
    assert profile_activation_peak(torch.nn.Linear(2, 2), max_num_batched_tokens=64, max_num_seqs=4,
                                   max_model_len=32, block_size=16, device=torch.device("cpu")) is None


@pytest.mark.cuda
def test_profiling_step_measures_a_peak_that_grows_with_the_token_budget(tiny_dir) -> None:
    """On CUDA the engine runs one step at maxNumBatchedTokens before sizing; a bigger step peaks higher."""
    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine

    seen = []

    def sizer(weights, activation, block_bytes, max_blocks):
        seen.append(activation)
        return size_kv_pool(budget_bytes=weights + activation + 64 * block_bytes, weights_bytes=weights,
                            activation_bytes=activation, others_bytes=0, block_bytes=block_bytes,
                            max_blocks=max_blocks)

    for tokens in (256, 4096):
        llm = LLMEngine.from_model_dir(tiny_dir, model_name="m", config=EngineConfig(
            device="cuda", max_num_batched_tokens=tokens, max_num_seqs=64, kv_pool_sizer=sizer))
        assert llm.num_kv_blocks == 64 and llm.kv_sizing is not None
        assert llm.kv_sizing.activation_bytes == seen[-1]
        del llm
    assert 0 < seen[0] < seen[1]
