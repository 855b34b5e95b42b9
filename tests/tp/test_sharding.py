"""The tensor-parallel split itself: shapes, per-rank safetensors slices, KV-head replication.

The last test runs a 4-rank group in threads of this process (gloo process groups need no
separate processes), so KV heads (2) are fewer than ranks and each is replicated on two ranks.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from kubeinfer_serving.distributed.group import TPGroup
from kubeinfer_serving.distributed.sharding import (
    TensorParallelError,
    iter_rank_safetensors,
    shard_tensor,
    tp_shape,
)
from kubeinfer_serving.engine.model_runner import ModelRunner, step_inputs_from_buffer
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.engine.scheduler import ScheduledSeq
from kubeinfer_serving.engine.sequence import Sequence
from kubeinfer_serving.models import loader
from kubeinfer_serving.models.llama import LlamaForCausalLM


def _config(heads=9, kv=3, inter=1536, vocab=49152):
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                           hidden_size=64 * heads, vocab_size=vocab)


@pytest.mark.parametrize(("cfg", "size", "message"), [
    (_config(), 2, "the model's 9 attention heads do not divide by tensor parallel size 2"),
    (_config(heads=12, kv=3), 2, "the model's 3 KV heads and tensor parallel size 2 do not divide one another"),
    (_config(heads=8, kv=8, inter=1000), 8, None),
    (_config(heads=8, kv=8, inter=1001), 8, "intermediate size 1001 does not divide by tensor parallel size 8"),
])
def test_splits_that_do_not_divide_name_the_numbers(cfg, size, message):
    if message is None:
        assert tp_shape(cfg, 0, size).intermediate == 125
        return
    with pytest.raises(TensorParallelError, match=message):
        tp_shape(cfg, 0, size)


def test_kv_heads_fewer_than_ranks_are_replicated_on_the_ranks_whose_queries_use_them():
    # 8 query heads, 2 KV heads (groups of 4), 4 ranks of 2 query heads: ranks 0-1 use KV head 0, ranks 2-3 head 1.
    shapes = [tp_shape(_config(heads=8, kv=2, inter=64, vocab=10), r, 4) for r in range(4)]
    assert [(s.num_heads, s.num_kv_heads, s.kv_head_start, s.kv_replicas) for s in shapes] == [
        (2, 1, 0, 2), (2, 1, 0, 2), (2, 1, 1, 2), (2, 1, 1, 2)]
    # vocabulary 10 over 4 ranks: 3 rows each, the last rank's row 9 then two zero rows
    table = torch.arange(10.0).unsqueeze(1).repeat(1, 4)
    last = shard_tensor("model.embed_tokens.weight", table, (10, 4), shapes[3])
    assert last[:, 0].tolist() == [9.0, 0.0, 0.0]


def test_rank_slices_read_from_safetensors_equal_slices_of_the_full_tensors(tiny_dir):
    cfg = loader.load_hf_config(tiny_dir)
    full = dict(loader.iter_safetensors(tiny_dir))
    shape = tp_shape(cfg, 1, 2)
    parts = dict(iter_rank_safetensors(tiny_dir, shape))
    assert parts.keys() == full.keys()
    q = full["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(parts["model.layers.0.self_attn.q_proj.weight"], q[q.shape[0] // 2:])
    k = full["model.layers.2.self_attn.k_proj.weight"]
    assert torch.equal(parts["model.layers.2.self_attn.k_proj.weight"], k[k.shape[0] // 2:])
    down = full["model.layers.3.mlp.down_proj.weight"]
    assert torch.equal(parts["model.layers.3.mlp.down_proj.weight"], down[:, down.shape[1] // 2:])
    emb = full["model.embed_tokens.weight"]
    assert torch.equal(parts["model.embed_tokens.weight"], emb[4096:])
    assert torch.equal(parts["model.norm.weight"], full["model.norm.weight"])


def test_four_ranks_with_replicated_kv_heads_compute_the_logits_of_one_rank(tiny_dir):
    cfg = loader.load_hf_config(tiny_dir)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    one = LlamaForCausalLM(cfg, 128, torch.float32, torch.device("cpu"))
    one.load_weights(loader.iter_safetensors(tiny_dir))
    runner = ModelRunner(one, 8, 16, torch.device("cpu"))
    seqs = [Sequence(f"s{i}", list(range(10 + i, 30 + 7 * i)), SamplingParams()) for i in range(3)]
    for i, seq in enumerate(seqs):
        seq.block_table = [2 * i, 2 * i + 1]
    inputs = runner.prepare([ScheduledSeq(s, len(s.prompt_token_ids), 0) for s in seqs])
    packed, counts = inputs.packed.copy(), inputs.counts
    with torch.inference_mode():
        expected = one.compute_logits(one(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta,
                                          inputs.logits_idx))
    store, rdv = TPGroup.host_store(4, 60)
    results: dict[int, torch.Tensor | BaseException] = {}

    def rank(r: int) -> None:
        try:
            st = store if r == 0 else TPGroup.connect_store(rdv, 4, 60)
            group = TPGroup(r, 4, torch.device("cpu"), st, 60)
            model = LlamaForCausalLM(cfg, 128, torch.float32, torch.device("cpu"), tp=group)
            assert model.num_kv_heads == 1
            model.load_weights(iter_rank_safetensors(tiny_dir, model.shard))
            kv = ModelRunner(model, 8, 16, torch.device("cpu")).kv_caches
            step = step_inputs_from_buffer(packed, torch.from_numpy(packed), *counts, 16)
            with torch.inference_mode():
                hidden = model(step.input_ids, step.positions, kv, step.meta, step.logits_idx)
                results[r] = model.compute_logits(hidden)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(not isinstance(v, BaseException) for v in results.values()), results
    assert all(results[r] is None for r in (1, 2, 3))
    assert results[0].shape == expected.shape == (3, cfg.vocab_size)
    assert torch.allclose(results[0], expected, atol=1e-4, rtol=0)
