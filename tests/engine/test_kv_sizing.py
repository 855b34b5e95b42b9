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

    def sizer(weights, activation, block_bytes, max_blocks, graph_bytes=None, extra_blocks=0):
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


# ---------------------------------------------------------------- CUDA graphs: graph memory + null block

GRAPHS = 37 * MiB + 4096  # a measured graph pool + static inputs (not a whole number of blocks)


@pytest.mark.parametrize("budget_mib", [700, 701, 777, 1000, 4096])
@pytest.mark.parametrize("share", [1, 3])
def test_auto_pool_plus_null_block_plus_graphs_fit_the_budget_with_no_block_to_spare(budget_mib, share) -> None:
    """What the model holds (weights + peak + graphs + pool + null block) plus the others never
    exceeds the budget, and for one auto model one more pool block would."""
    s = size(budget_bytes=budget_mib * MiB, graph_bytes=GRAPHS, extra_blocks=1, share=share)
    assert s.graph_bytes == GRAPHS and s.extra_blocks == 1
    held = 300 * MiB + 100 * MiB + GRAPHS + s.num_blocks * BLOCK + BLOCK
    assert s.reserved_bytes == held
    assert 200 * MiB + held <= budget_mib * MiB
    if share == 1:
        assert 200 * MiB + held + BLOCK > budget_mib * MiB
    assert s.available_bytes == budget_mib * MiB - 600 * MiB - GRAPHS - BLOCK


def test_graph_memory_and_the_null_block_shrink_an_auto_pool() -> None:
    plain = size()
    graphs = size(graph_bytes=GRAPHS, extra_blocks=1)
    assert plain.num_blocks - graphs.num_blocks == -(-(GRAPHS + BLOCK) // BLOCK)


def test_an_asked_pool_must_fit_beside_the_graphs_and_the_null_block() -> None:
    """400 MiB are left: a 400 MiB kvCacheBytes fits alone, not with a null block (nor with graphs)."""
    assert size(requested_bytes=400 * MiB).num_blocks == 400 * MiB // BLOCK
    for kw in ({"extra_blocks": 1}, {"graph_bytes": GRAPHS}):
        with pytest.raises(KVPoolSizeError) as err:
            size(requested_bytes=400 * MiB, **kw)
        assert "does not fit" in str(err.value)
    with pytest.raises(KVPoolSizeError) as err:
        size(requested_bytes=400 * MiB, graph_bytes=GRAPHS, extra_blocks=1)
    msg = str(err.value)
    assert f"CUDA graphs {GRAPHS / MiB:.2f} MiB ({GRAPHS} B)" in msg and "null block 0.06 MiB (65536 B)" in msg
    ok = size(requested_bytes=400 * MiB - GRAPHS - BLOCK, graph_bytes=GRAPHS, extra_blocks=1)
    assert ok.reserved_bytes + 200 * MiB <= 1000 * MiB


def test_the_log_line_names_graphs_and_null_block_only_when_there_are_some() -> None:
    line = size(graph_bytes=GRAPHS, extra_blocks=1).describe("'m'")
    assert f"- CUDA graphs {GRAPHS / MiB:.2f} MiB" in line and "- null block 0.06 MiB (65536 B) =" in line
    plain = size().describe("'m'")
    assert "CUDA graphs" not in plain and "null block" not in plain
    with pytest.raises(ValueError, match="graph_bytes and extra_blocks"):
        size(graph_bytes=-1)
    with pytest.raises(ValueError, match="graph_bytes and extra_blocks"):
        size(extra_blocks=-1)


def test_an_engine_with_decode_graphs_sizes_pool_null_block_and_static_inputs_inside_the_budget(
        tiny, monkeypatch) -> None:
    """CPU, graphs forced on (the padded static-input forward that CUDA captures): the sizer is told
    the graphs' measured bytes and one extra block, and what the engine then allocates (pool + null
    block + static inputs + weights) fits the budget it was sized against."""
    from kubeinfer_serving.engine import cuda_graphs
    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine

    hf_config, weights, tokenizer = tiny
    monkeypatch.setattr(cuda_graphs, "graphs_enabled", lambda device, enforce_eager: not enforce_eager)
    seen = []

    def sizer(weights_bytes, activation, block_bytes, max_blocks, graph_bytes=None, extra_blocks=0):
        seen.append((graph_bytes, extra_blocks))
        return size_kv_pool(budget_bytes=weights_bytes + 10 * MiB, weights_bytes=weights_bytes,
                            activation_bytes=activation, others_bytes=0, block_bytes=block_bytes,
                            max_blocks=max_blocks, fallback_bytes=256 * MiB, graph_bytes=graph_bytes,
                            extra_blocks=extra_blocks)

    for eager in (False, True):
        llm = LLMEngine.from_weights(hf_config, weights.items(), tokenizer=tokenizer, config=EngineConfig(
            device="cpu", max_num_seqs=8, kv_pool_sizer=sizer, enforce_eager=eager))
        graph_bytes, extra = seen[-1]
        if eager:
            assert (graph_bytes, extra) == (None, 0) and llm.runner.graphs is None
            assert llm.num_kv_blocks == 10 * MiB // BLOCK
            continue
        assert extra == 1 and graph_bytes == llm.cuda_graph_bytes > 0
        assert llm.runner.graphs is not None and llm.runner.kv_caches[0][0].shape[0] == llm.num_kv_blocks + 1
        assert llm.num_kv_blocks == (10 * MiB - graph_bytes - BLOCK) // BLOCK
        held = llm.weights_bytes + llm.kv_cache_bytes + llm.cuda_graph_bytes
        assert held == llm.kv_sizing.reserved_bytes <= llm.weights_bytes + 10 * MiB


@pytest.mark.cuda
def test_on_cuda_the_profiled_graph_memory_is_what_the_engine_graphs_hold(tiny_dir) -> None:
    """The throwaway capture before sizing measures the memory the engine's own graphs then hold."""
    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine

    def sizer(weights, activation, block_bytes, max_blocks, graph_bytes=None, extra_blocks=0):
        return size_kv_pool(budget_bytes=weights + activation + (graph_bytes or 0) + 65 * block_bytes,
                            weights_bytes=weights, activation_bytes=activation, others_bytes=0,
                            block_bytes=block_bytes, max_blocks=max_blocks, graph_bytes=graph_bytes,
                            extra_blocks=extra_blocks)

    llm = LLMEngine.from_model_dir(tiny_dir, model_name="m", config=EngineConfig(
        device="cuda", max_num_seqs=64, kv_pool_sizer=sizer))
    sizing = llm.kv_sizing
    assert llm.runner.graphs is not None, "graphs are on by default on CUDA"
    assert sizing.extra_blocks == 1 and sizing.graph_bytes > 0 and llm.num_kv_blocks == 64
    assert llm.cuda_graph_bytes <= sizing.graph_bytes * 1.05 + (1 << 20)
    assert llm.kv_cache_bytes == 65 * sizing.block_bytes
