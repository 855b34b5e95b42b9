"""Engine against transformers' continuous batching on the offline bench workload, CPU seconds.

On a shared machine a ~2 s engine run is easily hit by another job while a ~8 s CB run averages
the load out, so wall-clock ratios of single runs swing. This script runs the engine and CB
back to back for each concurrency, ``--reps`` times, in one process, and reports the median of
the per-rep ratios of process CPU seconds (``time.process_time``: all threads, so CB's
background thread counts) next to the wall-clock ratio. Same workload, engine config and CB
config as ``kubeinfer-bench`` (:mod:`kubeinfer_serving.bench.kubeinfer_bench`); outputs are
compared token for token.

    PYTHONPATH=serving python bench/engine_vs_cb_cpu.py --concurrency 32 64 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns {concurrency: {"cpu_ratio", "wall_ratio", "engine_cpu_s", "cb_cpu_s", "mismatches"}}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from kubeinfer_serving.bench.kubeinfer_bench import make_workload, run_engine, run_transformers_cb
    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine
    from kubeinfer_serving.models.builtin import ensure_builtin_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    path = str(ensure_builtin_model())
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    reqs = make_workload(args.num_requests, (16, 256), (8, 128), int(hf.config.vocab_size), args.seed)
    engines = {c: LLMEngine.from_model_dir(path, model_name="bench", config=EngineConfig(
        max_num_seqs=c, max_num_batched_tokens=2048, dtype="float32", device="cpu",
        enable_prefix_caching=False)) for c in args.concurrency}
    for c, eng in engines.items():  # warm-up
        run_engine(eng, reqs[:2])
        run_transformers_cb(hf, reqs[:2], c)

    def timed(fn):
        p0, w0 = time.process_time(), time.perf_counter()
        out = fn()[2]
        return time.perf_counter() - w0, time.process_time() - p0, out

    runs: dict[int, list[tuple[float, float, float, float, int]]] = {c: [] for c in args.concurrency}
    for rep in range(args.reps):
        for c in args.concurrency:
            we, pe, oe = timed(lambda c=c: run_engine(engines[c], reqs))
            wc, pc, oc = timed(lambda c=c: run_transformers_cb(hf, reqs, c))
            mism = sum(oe[r] != oc[r] for r, _, _ in reqs)
            runs[c].append((we, pe, wc, pc, mism))
            print(f"rep {rep} concurrency {c}: engine {we:.2f} s wall {pe:.2f} s CPU | CB {wc:.2f} s wall "
                  f"{pc:.2f} s CPU | ratio CPU {pc / pe:.2f} wall {wc / we:.2f} | mismatching requests {mism}",
                  flush=True)
    report = {}
    for c, rows in runs.items():
        report[c] = {
            "cpu_ratio": statistics.median(r[3] / r[1] for r in rows),
            "wall_ratio": statistics.median(r[2] / r[0] for r in rows),
            "engine_cpu_s": statistics.median(r[1] for r in rows),
            "cb_cpu_s": statistics.median(r[3] for r in rows),
            "mismatches": max(r[4] for r in rows),
        }
        print(f"concurrency {c}: engine/CB median ratio CPU {report[c]['cpu_ratio']:.2f}x, wall "
              f"{report[c]['wall_ratio']:.2f}x (engine {report[c]['engine_cpu_s']:.2f} s CPU, CB "
              f"{report[c]['cb_cpu_s']:.2f} s CPU, mismatching requests {report[c]['mismatches']})")
    return report


if __name__ == "__main__":
    main()
