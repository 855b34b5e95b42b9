"""Host time per decode step: schedule, prepare (model inputs) and the post-step update, on CPU.

Builds the engine's real scheduler, block manager and model runner (over a one-layer random
Llama, so the KV pool is small), puts N sequences of ``--context`` tokens into the running
batch, and then times ``--steps`` decode steps without the forward pass: ``Scheduler.schedule``,
``ModelRunner.prepare`` and the post-step update (``Scheduler.update_from_output`` with one
sampled token per sequence). ``prepare`` is what every device needs; the CPU attention
backends also build a per-step plan (the ``cpu`` backend: prefill chunks and the decode rows'
arrays; older checkouts: the reference's grouped SDPA calls), timed separately as
``cpu_attention_plan`` (older checkouts built it inside ``prepare``). Prints a table and
writes JSON.

    PYTHONPATH=serving python bench/host_overhead.py --seqs 64 256 --context 768 --out host.json

Works against older checkouts too (``PYTHONPATH=<old>/serving``): where the scheduler has no
``update_from_output`` it applies the same bookkeeping the engine did inline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _post_update(scheduler, plan, sampled: list[int | None]) -> None:
    if hasattr(scheduler, "update_from_output"):
        scheduler.update_from_output(plan, sampled)
        return
    for item, tok in zip(plan.scheduled, sampled, strict=True):  # the engine's inline loop before issue 10
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        scheduler.block_manager.cache_full_blocks(seq)
        if tok is not None:
            seq.output_token_ids.append(tok)


def measure(num_seqs: int, context: int, steps: int, block_size: int = 16) -> dict[str, float]:
    """Median host milliseconds per decode step of each phase at ``num_seqs`` running sequences."""
    from kubeinfer_serving.engine.block_manager import BlockManager
    from kubeinfer_serving.engine.model_runner import ModelRunner
    from kubeinfer_serving.engine.sampling import SamplingParams
    from kubeinfer_serving.engine.scheduler import Scheduler
    from kubeinfer_serving.engine.sequence import Sequence
    from kubeinfer_serving.models.llama import LlamaForCausalLM
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=8192, max_position_embeddings=context + steps + 8)
    model = LlamaForCausalLM(cfg, max_positions=context + steps + 8, dtype=torch.float32, device=torch.device("cpu"))
    per_seq = -(-(context + steps + 1) // block_size)
    num_blocks = num_seqs * per_seq + 16
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * context)
    runner = ModelRunner(model, num_blocks, block_size, torch.device("cpu"))
    for i in range(num_seqs):
        prompt = [(i * 7919 + j * 31) % 8000 + 6 for j in range(context - 1)]  # distinct: no prefix sharing
        sched.add(Sequence(f"s{i}", prompt, SamplingParams(max_tokens=steps + 10, ignore_eos=True)))
    plan = sched.schedule()  # admits everyone with their whole prompt
    _post_update(sched, plan, [1] * len(plan.scheduled))  # now every sequence decodes at `context` tokens
    phases: dict[str, list[float]] = {"schedule": [], "prepare": [], "update": [], "cpu_attention_plan": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        inputs = runner.prepare(plan.scheduled)
        t2 = time.perf_counter()
        if hasattr(inputs, "meta"):  # the CPU attention path's per-step plan (built lazily by the first layer)
            meta = inputs.meta
            if hasattr(meta, "cpu_plan"):  # the cpu backend's plan (float32)
                meta.cpu_plan()
            else:  # older checkouts: the reference's
                meta.reference_plan()
            phases["cpu_attention_plan"].append(time.perf_counter() - t2)
            t2 = time.perf_counter()
        _post_update(sched, plan, [1] * len(plan.scheduled))
        t3 = time.perf_counter()
        assert len(plan.scheduled) == num_seqs and plan.num_batched_tokens == num_seqs
        phases["schedule"].append(t1 - t0)
        phases["prepare"].append(t2 - t1)
        phases["update"].append(t3 - t2)
    out = {f"{k}_ms": 1000 * statistics.median(v) for k, v in phases.items() if v}
    out["schedule_plus_prepare_ms"] = out["schedule_ms"] + out["prepare_ms"]
    return out


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the results written to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 256], help="running sequences per step")
    ap.add_argument("--context", type=int, default=768, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=50, help="timed decode steps (median reported)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {"context": args.context, "steps": args.steps, "runs": []}
    print(f"{'seqs':>5} {'schedule ms':>12} {'prepare ms':>11} {'update ms':>10} {'sched+prep ms':>14}"
          f" {'cpu attn plan ms':>17}")
    for n in args.seqs:
        r = measure(n, args.context, args.steps)
        results["runs"].append({"num_seqs": n, **r})
        print(f"{n:>5} {r['schedule_ms']:>12.3f} {r['prepare_ms']:>11.3f} {r['update_ms']:>10.3f} "
              f"{r['schedule_plus_prepare_ms']:>14.3f} {r.get('cpu_attention_plan_ms', float('nan')):>17.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
