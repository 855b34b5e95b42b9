"""Engine vs sequential Hugging Face ``generate`` on the engine-equality workload (CPU or GPU).

Runs the 36 mixed requests of ``tests/engine`` (prompts 1-150 tokens, outputs 1-40 tokens,
greedy, EOS ignored, seed 1234) through our continuous-batching engine (all submitted at
once) and through ``generate`` one request at a time, in the same process, interleaved for
``--reps`` repetitions. Prints output tokens/s of each (median over reps), their ratio,
exact step counters of the engine, and whether every request matched token for token.

    .venv/bin/python bench/engine_vs_hf.py [--model DIR] [--reps 3] [--threads 1] [--json out.json]
        [--transformers-cb]   # adds transformers' continuous batching as a third method per rep
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def make_workload(seed: int = 1234, n: int = 36) -> list[tuple[str, list[int], int]]:
    """(request id, prompt ids, output tokens) triples, as in tests/engine/conftest.py."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        plen = rng.choice([1, 2, 5, 9, 17, 31, 48, 64, 80, 100, 130, 150])
        prompt = [rng.randrange(6, 8192) for _ in range(plen)]
        reqs.append((f"req-{i}", prompt, rng.randint(1, 40)))
        rng.randint(0, 40)  # the arrival step of the test workload (unused: all arrive at once here)
    return reqs


def run_engine(engine, reqs) -> tuple[float, dict[str, list[int]]]:
    """Seconds to finish all requests submitted at once, and their tokens."""
    from kubeinfer_serving.engine.sampling import SamplingParams

    out: dict[str, list[int]] = {rid: [] for rid, _, _ in reqs}
    t0 = time.perf_counter()
    for rid, prompt, n in reqs:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return time.perf_counter() - t0, out


def run_hf(model, reqs, device) -> tuple[float, dict[str, list[int]]]:
    """Seconds for sequential ``generate`` over all requests, and their tokens."""
    import torch

    out = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for rid, prompt, n in reqs:
            ids = torch.tensor([prompt], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
            out[rid] = gen[0, len(prompt):].tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run_hf_cb(model, reqs, max_batch: int, block_size: int = 16) -> tuple[float, dict[str, list[int]]]:
    """Seconds for transformers' own continuous batching over all requests submitted at once, and
    their tokens: :func:`kubeinfer_serving.bench.kubeinfer_bench.run_transformers_cb` (per-request
    ``max_new_tokens``, EOS disabled, cache sized explicitly), without its TTFTs."""
    from kubeinfer_serving.bench.kubeinfer_bench import run_transformers_cb

    seconds, _, out = run_transformers_cb(model, reqs, max_batch, block_size)
    return seconds, out


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print (and optionally write) the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", help="HF model dir (default: the built-in tiny Llama)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--transformers-cb", action="store_true",
                    help="also run transformers' continuous batching (max batch = --max-num-seqs) each rep")
    args = ap.parse_args(argv)

    import torch
    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine
    from kubeinfer_serving.models.builtin import ensure_builtin_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = args.model or str(ensure_builtin_model())
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       dtype="float32")
    engine = LLMEngine.from_model_dir(path, model_name="bench", config=cfg)
    device = engine.device
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    hf.generation_config.eos_token_id = None
    reqs = make_workload()
    total_out = sum(n for _, _, n in reqs)

    run_engine(engine, reqs[:4])  # warm-up both paths
    run_hf(hf, reqs[:2], device)
    if args.transformers_cb:
        run_hf_cb(hf, reqs[:2], args.max_num_seqs)
    eng_tps, hf_tps, cb_tps, mismatches, cb_mismatches = [], [], [], 0, 0
    for rep in range(args.reps):
        steps_before = engine.num_steps
        t_eng, out_eng = run_engine(engine, reqs)
        steps = engine.num_steps - steps_before
        t_hf, out_hf = run_hf(hf, reqs, device)
        mismatches = sum(out_eng[rid] != out_hf[rid] for rid, _, _ in reqs)
        eng_tps.append(total_out / t_eng)
        hf_tps.append(total_out / t_hf)
        line = (f"rep {rep}: engine {eng_tps[-1]:.0f} tok/s ({steps} steps), "
                f"HF sequential {hf_tps[-1]:.0f} tok/s, mismatching requests {mismatches}/{len(reqs)}")
        if args.transformers_cb:
            t_cb, out_cb = run_hf_cb(hf, reqs, args.max_num_seqs)
            cb_tps.append(total_out / t_cb)
            cb_mismatches = sum(out_cb[rid] != out_hf[rid] for rid, _, _ in reqs)
            line += f", transformers CB {cb_tps[-1]:.0f} tok/s (mismatching {cb_mismatches})"
        print(line)
    result = {
        "device": str(device),
        "threads": args.threads,
        "requests": len(reqs),
        "output_tokens": total_out,
        "engine_tok_s_median": statistics.median(eng_tps),
        "hf_sequential_tok_s_median": statistics.median(hf_tps),
        "ratio": statistics.median(e / h for e, h in zip(eng_tps, hf_tps, strict=True)),
        "engine_steps": steps,
        "mismatching_requests": mismatches,
    }
    if cb_tps:
        result["transformers_cb_tok_s_median"] = statistics.median(cb_tps)
        result["ratio_vs_transformers_cb"] = statistics.median(e / c for e, c in zip(eng_tps, cb_tps, strict=True))
        result["transformers_cb_mismatching_requests"] = cb_mismatches
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
