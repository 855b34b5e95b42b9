"""What logprobs, penalties and structured outputs cost the engine (CPU or GPU), and what they cost when unused.

Runs one fixed workload (``--requests`` requests, prompts 16-256 tokens, ``--max-tokens``
output tokens each, all submitted at once, greedy, EOS ignored) through the engine of the
checkout on ``PYTHONPATH`` in one of these modes:

- ``plain``: no request uses any new feature (compare this mode between two checkouts: the
  before/after cost of the feature code when unused);
- ``logprobs``: every request asks for ``logprobs=5``;
- ``penalties``: every request uses presence/frequency/repetition penalties and a ``logit_bias``;
- ``json``: every request is constrained by a JSON schema (llguidance; greedy sampling within it);
  requests then stop when their JSON is complete, so throughput is tokens actually generated.

Prints output tokens per wall second and per process-CPU second (medians over ``--reps``,
each rep one full run after a warm-up run). With one torch thread on a shared machine the
CPU-second rate is the steadier one: other processes' load lengthens wall time, not CPU time.
Run checkouts in alternation in separate processes, e.g.::

    for i in 1 2 3; do
      PYTHONPATH=/work/main/serving python bench/sampling_features.py --mode plain
      PYTHONPATH=$PWD/serving python bench/sampling_features.py --mode plain
    done
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 6},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def make_workload(n: int, max_tokens: int, seed: int = 7) -> list[tuple[str, list[int], int]]:
    """(request id, prompt ids, output tokens): prompts 16-256 random ids in [6, 8192)."""
    rng = random.Random(seed)
    return [(f"r{i}", [rng.randrange(6, 8192) for _ in range(rng.randint(16, 256))], max_tokens) for i in range(n)]


def params_for(mode: str, n: int, guide=None):
    """The SamplingParams of every request in ``mode``."""
    from kubeinfer_serving.engine.sampling import SamplingParams

    if mode == "plain":
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    if mode == "logprobs":
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=5)
    if mode == "penalties":
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, presence_penalty=0.5,
                              frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={100: -5.0, 200: 2.0})
    if mode == "json":
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, guide=guide)
    raise ValueError(mode)


def run(engine, reqs, mode: str, guide) -> tuple[float, float, int]:
    """Wall seconds and process CPU seconds to finish every request submitted at once, and output tokens."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    for rid, prompt, n in reqs:
        engine.add_request(rid, prompt, params_for(mode, n, guide))
    tokens = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens += len(o.new_token_ids)
    return time.perf_counter() - t0, time.process_time() - c0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="plain", choices=["plain", "logprobs", "penalties", "json"])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine
    from kubeinfer_serving.models.builtin import ensure_builtin_model

    cfg = EngineConfig(device=args.device, max_num_seqs=64, max_num_batched_tokens=2048, enable_prefix_caching=False)
    engine = LLMEngine.from_model_dir(ensure_builtin_model(), model_name="bench", config=cfg)
    guide = None
    if args.mode == "json":
        from kubeinfer_serving.structured.grammar import GrammarSpec, compiler_for

        comp = compiler_for(engine.tokenizer, engine.vocab_size, sorted(engine.eos_token_ids))
        guide = comp.compile(GrammarSpec("json", json.dumps(SCHEMA, sort_keys=True)))
    reqs = make_workload(args.requests, args.max_tokens)
    run(engine, reqs[:4], args.mode, guide)  # warm-up
    rates, cpu_rates, toks = [], [], 0
    for _ in range(args.reps):
        secs, cpu_secs, toks = run(engine, reqs, args.mode, guide)
        rates.append(toks / secs)
        cpu_rates.append(toks / cpu_secs)
    result = {"mode": args.mode, "device": args.device, "requests": args.requests, "output_tokens": toks,
              "tok_per_s_median": statistics.median(rates), "tok_per_cpu_s_median": statistics.median(cpu_rates),
              "tok_per_s": rates, "tok_per_cpu_s": cpu_rates}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
