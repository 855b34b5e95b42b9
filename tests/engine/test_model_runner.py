"""ModelRunner.prepare: the vectorized step inputs equal a per-sequence construction."""

from __future__ import annotations

import torch
from kubeinfer_serving.engine.block_manager import BlockManager
from kubeinfer_serving.engine.model_runner import ModelRunner
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.engine.scheduler import Scheduler
from kubeinfer_serving.engine.sequence import Sequence
from kubeinfer_serving.models.llama import LlamaForCausalLM
from transformers import LlamaConfig


def test_prepare_matches_a_per_sequence_construction():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=500, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg, max_positions=256, dtype=torch.float32, device=torch.device("cpu"))
    bs = 4
    bm = BlockManager(64, bs)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12)
    runner = ModelRunner(model, 64, bs, torch.device("cpu"))
    seqs = [Sequence(f"s{i}", [10 * i + j + 1 for j in range(n)], SamplingParams(max_tokens=20))
            for i, n in enumerate([3, 9, 1, 14])]
    for s in seqs[:2]:
        sched.add(s)
    sched.update_from_output(plan := sched.schedule(), [7 if it.samples else None for it in plan.scheduled])
    for s in seqs[2:]:
        sched.add(s)
    plan = sched.schedule()  # decode rows, a late join and a chunk cut by the token budget
    assert {it.num_new_tokens for it in plan.scheduled} >= {1} and any(not it.samples for it in plan.scheduled)
    inputs = runner.prepare(plan.scheduled)

    ids, pos, slots, qsl, lens, logits_idx, rows = [], [], [], [0], [], [], []
    for i, it in enumerate(plan.scheduled):
        start, n = it.num_computed_before, it.num_new_tokens
        table = it.seq.block_table
        for p in range(start, start + n):
            ids.append(it.seq.token_at(p))
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + n)
        lens.append(start + n)
        if it.samples:
            logits_idx.append(qsl[-1] - 1)
            rows.append(i)
    assert inputs.input_ids.tolist() == ids
    assert inputs.positions.tolist() == pos
    assert inputs.meta.slot_mapping.tolist() == slots
    assert inputs.meta.query_start_loc.tolist() == qsl
    assert inputs.meta.seq_lens.tolist() == lens
    assert inputs.logits_idx.tolist() == logits_idx and inputs.sample_rows == rows
    assert inputs.meta.max_query_len == max(it.num_new_tokens for it in plan.scheduled)
    for i, it in enumerate(plan.scheduled):
        table = inputs.meta.block_tables[i].tolist()
        assert table[:len(it.seq.block_table)] == it.seq.block_table
        assert all(b == 0 for b in table[len(it.seq.block_table):])
