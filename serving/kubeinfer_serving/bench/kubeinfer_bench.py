"""Offline throughput/latency benchmark: our engine against three baselines on one workload, same run.

Methods (all greedy, EOS ignored so every request produces exactly its output length; all
requests arrive at t0, so TTFT includes queueing):

* ``engine``: our :class:`~kubeinfer_serving.engine.llm_engine.LLMEngine` with
  ``max_num_seqs`` = the concurrency; TTFTs come from its step statistics.
* ``transformers_cb``: transformers' continuous batching (``ContinuousBatchingManager``) with at
  most ``concurrency`` requests per batch; TTFT from its per-token timestamps.
* ``static``: Hugging Face ``generate`` over batches of ``--static-batch`` (8) requests, left
  padded, each batch running until its longest request ends (one line); with
  ``--static-batch concurrency`` the batch size is each concurrency in turn (one point per
  concurrency, like the engine); TTFT = when its batch's first token came out.
* ``sequential``: ``generate`` one request at a time (one line).
* ``engine_int8`` / ``engine_fp8`` (with ``--compare-quantization int8|fp8``): our engine again with
  that weight quantization, per concurrency, next to the unquantized engine: tokens/s, weight
  bytes and the fraction of output tokens equal to the unquantized engine's (greedy agreement;
  quantized weights are not expected to be token-identical).

The workload is seeded random token ids (prompt and output lengths uniform in the given
ranges). Methods are interleaved within each repetition; the medians over ``--reps`` are
reported with the ratios of the engine to each baseline. Outputs of the unquantized methods are
checked against ``sequential`` token for token (``mismatching_requests_vs_sequential``: requests
whose tokens differ, 0 when identical). Writes ``<out-dir>/kubeinfer_bench.json`` and a PNG (output
tokens/s and P99 TTFT against concurrency, one line per method). The HTTP serving benchmark
is ``bench/serve_bench.py``.

On CUDA it also prints, per concurrency, the engine's decode tokens/s next to the HBM roofline
(weights + KV bytes per pure-decode step over a measured device-to-device copy bandwidth) and
the fraction reached (:mod:`kubeinfer_serving.bench.roofline`), also in the JSON.
``--shapes llama-3.2-1b`` (or ``llama-3.1-8b``) runs every method on random weights of that
model's shapes (config values in :mod:`~kubeinfer_serving.bench.roofline`; no hub access).

    kubeinfer-bench [--model DIR | --shapes NAME] [--device cuda] [--concurrency 8 32 64] [--reps 3] [--smoke]
    python -m kubeinfer_serving.bench.kubeinfer_bench ...   (the same)

The GPU workload of issue 10: ``kubeinfer-bench --shapes llama-3.2-1b --num-requests 256
--prompt-len 512 512 --output-len 256 256 --concurrency 64 256 --methods engine transformers_cb static``.
The CPU workload of issue 19 (SmolLM2 against transformers at concurrency 8 and 32, int8 next to
unquantized): ``kubeinfer-bench --model builtin://smollm2-135m-instruct --device cpu --threads 2
--num-requests 32 --prompt-len 16 128 --output-len 16 64 --concurrency 8 32 --static-batch concurrency
--compare-quantization int8 --reps 1``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from kubeinfer_serving.bench.roofline import (
    SHAPES,
    DecodeStep,
    format_roofline,
    kv_bytes_per_token,
    measure_copy_bandwidth,
    shapes_config,
    summarize_decode,
)

#: The methods, in the order each repetition runs them.
METHODS = ("sequential", "static", "engine", "transformers_cb")


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int,
                  seed: int) -> list[tuple[str, list[int], int]]:
    """``n`` (request id, prompt token ids, output tokens) triples, seeded; ids avoid 0..5 (special tokens)."""
    rng = random.Random(seed)
    return [(f"r{i}", [rng.randrange(6, vocab) for _ in range(rng.randint(*prompt_range))],
             rng.randint(*output_range)) for i in range(n)]


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def _summary(seconds: float, ttfts: list[float], out_tokens: int) -> dict[str, float]:
    return {"seconds": seconds, "output_tok_s": out_tokens / seconds, "ttft_mean_s": statistics.fmean(ttfts),
            "ttft_median_s": statistics.median(ttfts), "ttft_p99_s": _pct(ttfts, 99)}


def run_engine(engine, reqs, decode_steps: list[DecodeStep] | None = None
               ) -> tuple[float, list[float], dict[str, list[int]]]:
    """Seconds, TTFTs and tokens of ``reqs`` through the engine, all arriving at t0.

    Args:
        decode_steps: when given, every pure-decode step (each running sequence one token, no
            preemption) is appended with its wall time, rows and context tokens (the K/V
            positions its attention reads, the new token's included).
    """
    from kubeinfer_serving.engine.sampling import SamplingParams

    out: dict[str, list[int]] = {rid: [] for rid, _, _ in reqs}
    ttfts: list[float] = []
    t0 = time.monotonic()
    for rid, prompt, n in reqs:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                           arrival_time=t0)
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        rows, context = len(running), sum(len(s) for s in running)
        s0 = time.perf_counter()
        outputs, stats = engine.step_with_stats()
        took = time.perf_counter() - s0
        if (decode_steps is not None and rows and stats.num_scheduled_seqs == rows == stats.num_batched_tokens
                and not stats.num_preemptions):
            decode_steps.append(DecodeStep(took, rows, context))
        ttfts.extend(stats.ttfts)
        for o in outputs:
            out[o.request_id].extend(o.new_token_ids)
    return time.monotonic() - t0, ttfts, out


def run_transformers_cb(model, reqs, max_batch: int, block_size: int = 16):
    """Seconds, TTFTs and tokens through transformers' continuous batching (cache sized explicitly)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    longest = max(len(p) + n for _, p, n in reqs)
    gen_cfg = GenerationConfig(do_sample=False, eos_token_id=None, max_new_tokens=max(n for _, _, n in reqs))
    cb_cfg = ContinuousBatchingConfig(block_size=block_size, num_blocks=max_batch * (-(-longest // block_size)) + 8,
                                      max_batch_tokens=2048, max_requests_per_batch=max_batch)
    out: dict[str, list[int]] = {}
    ttfts: list[float] = []
    with model.continuous_batching_context_manager(generation_config=gen_cfg, continuous_batching_config=cb_cfg,
                                                   block=True, timeout=60, warmup=False) as mgr:
        t0 = time.perf_counter()
        for rid, prompt, n in reqs:
            mgr.add_request(list(prompt), request_id=rid, max_new_tokens=n, record_timestamps=True)
        while len(out) < len(reqs):
            res = mgr.get_result(timeout=300)
            if res is None:
                raise RuntimeError("transformers continuous batching returned nothing within 300 s")
            if res.is_finished():
                if res.error:
                    raise RuntimeError(f"transformers continuous batching failed {res.request_id}: {res.error}")
                out[res.request_id] = list(res.generated_tokens)
                ttfts.append(res.timestamps[0] - t0)
        seconds = time.perf_counter() - t0
    return seconds, ttfts, out


class _FirstToken:
    """A ``generate`` streamer that records when the first generated token came out."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_static(model, reqs, batch: int, pad_id: int):
    """Seconds, TTFTs and tokens of ``generate`` over left-padded batches of ``batch`` requests."""
    out: dict[str, list[int]] = {}
    ttfts: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(reqs), batch):
            group = reqs[i:i + batch]
            width = max(len(p) for _, p, _ in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, (_, p, _) in enumerate(group):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            streamer = _FirstToken()
            gen = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max(n for _, _, n in group),
                                 do_sample=False, pad_token_id=pad_id, streamer=streamer)
            for r, (rid, _, n) in enumerate(group):
                out[rid] = gen[r, width:width + n].tolist()
                ttfts.append(streamer.first - t0)
    return time.perf_counter() - t0, ttfts, out


def run_sequential(model, reqs):
    """Seconds, TTFTs and tokens of ``generate`` one request at a time."""
    out: dict[str, list[int]] = {}
    ttfts: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for rid, prompt, n in reqs:
            ids = torch.tensor([prompt], device=model.device)
            streamer = _FirstToken()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 streamer=streamer)
            out[rid] = gen[0, len(prompt):].tolist()
            ttfts.append(streamer.first - t0)
    return time.perf_counter() - t0, ttfts, out


def token_agreement(got: dict[str, list[int]], ref: dict[str, list[int]]) -> float:
    """Fraction (0..1) of output positions where ``got`` has the same token as ``ref``, over all
    requests (positions after a request's first difference count too: greedy agreement)."""
    same = total = 0
    for rid, want in ref.items():
        have = got[rid]
        same += sum(a == b for a, b in zip(have, want, strict=False))
        total += max(len(have), len(want))
    return same / total if total else 1.0


def _static_batch(value: str) -> int | str:
    """``--static-batch``: a positive batch size, or ``concurrency`` (the batch follows each concurrency)."""
    if value == "concurrency":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"--static-batch must be a positive integer or 'concurrency', got {value!r}")
    return size


def format_table(report: dict) -> str:
    """The report as a Markdown table: per concurrency, each method's output tokens/s and P99 TTFT,
    the engine's ratio to it (per-repetition median), then the token checks and weight bytes."""
    conc = report["concurrency"]
    lines = ["| concurrency | method | output tok/s | P99 TTFT (s) | engine / method |", "|---|---|---|---|---|"]
    for i, c in enumerate(conc):
        ratios = report["engine_ratio_per_rep_median"][str(c)]
        for method, rows in report["methods"].items():
            row = rows[i] if len(rows) == len(conc) else rows[0]
            if method == "engine":
                ratio = "1"
            elif f"vs_{method}" in ratios:
                ratio = f"{ratios[f'vs_{method}']:.2f}"
            else:
                ratio = f"{1 / ratios[f'{method}_vs_engine']:.2f}"
            lines.append(f"| {c} | {method} | {row['output_tok_s']:.1f} | {row['ttft_p99_s']:.2f} | {ratio} |")
    mism = ", ".join(f"{m} {n}" for m, n in report["mismatching_requests_vs_sequential"].items())
    lines.append(f"\nrequests whose tokens differ from {report['mismatch_reference']}: {mism} "
                 f"(of {report['num_requests']})")
    q = report["quantization_comparison"]
    if q:
        lines.append(f"{q['method']}: weights {q['weights_bytes'] / 2**20:.1f} MiB vs "
                     f"{q['unquantized_weights_bytes'] / 2**20:.1f} MiB unquantized "
                     f"({q['weights_bytes'] / q['unquantized_weights_bytes']:.2f}x); greedy token agreement "
                     f"with the unquantized engine {100 * q['greedy_token_agreement_vs_engine']:.1f}%")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> bool:
    """Write the PNG; False (and a message) when matplotlib is not installed (``pip install 'kubeinfer[bench]'``)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'kubeinfer[bench]'): no PNG written")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = report["concurrency"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, rows in report["methods"].items():
        if len(rows) == len(conc):  # one point per concurrency
            ax1.plot(conc, [r["output_tok_s"] for r in rows], "-o", label=method)
            ax2.plot(conc, [r["ttft_p99_s"] for r in rows], "-o", label=method)
        else:  # independent of concurrency: a horizontal line
            ax1.plot(conc, [rows[0]["output_tok_s"]] * len(conc), "--", label=method)
            ax2.plot(conc, [rows[0]["ttft_p99_s"]] * len(conc), "--", label=method)
    ax1.set(xlabel="concurrency (max running requests)", ylabel="output tokens/s", title="throughput")
    ax2.set(xlabel="concurrency (max running requests)", ylabel="P99 TTFT (s)", title="P99 time to first token")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['device']}, {report['num_requests']} requests, {report['output_tokens']} output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the report written to JSON."""
    ap = argparse.ArgumentParser(prog="kubeinfer-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face model dir or builtin://NAME, e.g. builtin://smollm2-135m-instruct "
                    "(default: the built-in tiny Llama)")
    ap.add_argument("--quantization", default="none", choices=["none", "int8", "fp8"],
                    help="the engine's weight quantization (the baselines stay unquantized)")
    ap.add_argument("--shapes", choices=sorted(SHAPES),
                    help="random weights of this model's shapes instead of --model (GPU workloads)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when available)")
    ap.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods to run (the engine always runs)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--static-batch", type=_static_batch, default=8,
                    help="generate's batch size for the static method, or 'concurrency' (one batch size per concurrency)")
    ap.add_argument("--compare-quantization", choices=["int8", "fp8"],
                    help="also run the engine with this weight quantization (method engine_QUANT): tokens/s, "
                    "weight bytes and greedy agreement with the unquantized engine")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for CI (well under 3 minutes)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_requests, args.prompt_len, args.output_len = 8, (4, 32), (2, 8)
        args.concurrency, args.reps = [4], 1

    from transformers import AutoModelForCausalLM

    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine
    from kubeinfer_serving.models.builtin import builtin_model_dir, ensure_builtin_model

    torch.set_num_threads(args.threads)
    methods = ["engine"] + [m for m in METHODS if m != "engine" and m in args.methods]
    quant_method = f"engine_{args.compare_quantization}" if args.compare_quantization else None
    static_follows = args.static_batch == "concurrency"
    static_sizes = list(args.concurrency) if static_follows else [args.static_batch]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = EngineConfig(dtype=args.dtype).resolve_dtype(device)
    if args.shapes:
        # Hugging Face's own random initialisation (std = initializer_range), created on the device.
        path = f"random weights, {args.shapes} shapes"
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(shapes_config(args.shapes), dtype=dtype).eval()
    else:
        path = args.model or str(ensure_builtin_model())
        if path.startswith("builtin://"):
            path = str(builtin_model_dir(path[len("builtin://"):]))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    reqs = make_workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len),
                         int(hf.config.vocab_size), args.seed)
    total_out = sum(n for _, _, n in reqs)
    longest = max(len(p) + n for _, p, n in reqs)

    def engine_for(c: int, quantization: str) -> LLMEngine:
        # The pool holds c requests of the longest length (never preempts), sized explicitly so
        # that engines for several concurrencies fit one device side by side.
        cfg = EngineConfig(max_num_seqs=c, max_num_batched_tokens=2048, dtype=dtype, device=str(device),
                           enable_prefix_caching=False, max_model_len=longest,
                           num_kv_blocks=c * -(-longest // 16) + 1, quantization=quantization)
        return LLMEngine.from_weights(hf.config, hf.state_dict().items(), config=cfg, model_name="bench")

    engines = {c: engine_for(c, args.quantization) for c in args.concurrency}
    quant_engines = {c: engine_for(c, args.compare_quantization) for c in args.concurrency} if quant_method else {}
    pad_id = 0
    warm = reqs[:2]  # warm-up every path once
    for c, eng in engines.items():
        run_engine(eng, warm)
        if quant_method:
            run_engine(quant_engines[c], warm)
        if "transformers_cb" in methods:
            run_transformers_cb(hf, warm, c)
    if "static" in methods:
        for size in static_sizes:
            run_static(hf, warm, size, pad_id)
    if "sequential" in methods:
        run_sequential(hf, warm)

    runs: dict[str, list[list[dict]]] = {m: [] for m in methods + ([quant_method] if quant_method else [])}
    mismatches: dict[str, int] = {}
    agreement: dict[str, float] = {}
    engine_out: dict[int, dict[str, list[int]]] = {}  # concurrency -> the unquantized engine's tokens, this rep
    decode: dict[int, list[list[DecodeStep]]] = {c: [] for c in args.concurrency}
    for rep in range(args.reps):
        ref = None
        if "sequential" in methods:
            t, ttft, ref = run_sequential(hf, reqs)
            runs["sequential"].append([_summary(t, ttft, total_out)])
        if "static" in methods:
            rows = []
            for size in static_sizes:
                t, ttft, out = run_static(hf, reqs, size, pad_id)
                rows.append(_summary(t, ttft, total_out) | ({"concurrency": size} if static_follows else {}))
                ref = ref or out
                mismatches["static"] = max(mismatches.get("static", 0), sum(out[r] != ref[r] for r, _, _ in reqs))
            runs["static"].append(rows)

        def engine_run(c):
            decode[c].append([])
            t, ttft, out = run_engine(engines[c], reqs, decode[c][-1])
            engine_out[c] = out
            return t, ttft, out

        named = [("engine", engine_run), ("transformers_cb", lambda c: run_transformers_cb(hf, reqs, c))]
        if quant_method:
            named.append((quant_method, lambda c: run_engine(quant_engines[c], reqs)))
        for name, fn in named:
            if name not in runs:
                continue
            rows = []
            for c in args.concurrency:
                t, ttft, out = fn(c)
                rows.append(_summary(t, ttft, total_out) | {"concurrency": c})
                if name == quant_method:  # against the unquantized engine, not token-identical by design
                    agreement[name] = min(agreement.get(name, 1.0), token_agreement(out, engine_out[c]))
                    continue
                ref = ref or out
                mismatches[name] = max(mismatches.get(name, 0), sum(out[r] != ref[r] for r, _, _ in reqs))
            runs[name].append(rows)
        tok_s = {m: "/".join(f"{r['output_tok_s']:.0f}" for r in v[-1]) for m, v in runs.items()}
        print(f"rep {rep}: " + ", ".join(f"{m} {t} tok/s" for m, t in tok_s.items()))

    def median_rows(reps: list[list[dict]]) -> list[dict]:
        return [{k: statistics.median(rep[i][k] for rep in reps) for k in reps[0][i]} for i in range(len(reps[0]))]

    summaries = {m: median_rows(v) for m, v in runs.items()}
    ratios = {}
    for i, c in enumerate(args.concurrency):
        eng = [rep[i]["output_tok_s"] for rep in runs["engine"]]
        ratios[str(c)] = {}
        for m in methods[1:]:
            col = i if m == "transformers_cb" or (m == "static" and static_follows) else 0
            ratios[str(c)][f"vs_{m}"] = statistics.median(
                e / rep[col]["output_tok_s"] for e, rep in zip(eng, runs[m], strict=True))
    quantized = {}
    if quant_method:
        for i, c in enumerate(args.concurrency):
            ratios[str(c)][f"{quant_method}_vs_engine"] = statistics.median(
                q[i]["output_tok_s"] / e[i]["output_tok_s"] for q, e in zip(runs[quant_method], runs["engine"],
                                                                              strict=True))
        quantized = {"method": quant_method, "weights_bytes": quant_engines[args.concurrency[0]].weights_bytes,
                     "unquantized_weights_bytes": engines[args.concurrency[0]].weights_bytes,
                     "greedy_token_agreement_vs_engine": agreement[quant_method]}
    roofline = {}
    if device.type == "cuda":
        # The engine's pure-decode steps against the HBM roofline (median rep by decode tokens/s).
        bandwidth = measure_copy_bandwidth(device)
        weights = engines[args.concurrency[0]].weights_bytes
        kv = kv_bytes_per_token(hf.config, dtype)
        for c in args.concurrency:
            per_rep = [summarize_decode(steps, weights, kv, bandwidth) for steps in decode[c] if steps]
            if per_rep:
                roofline[str(c)] = sorted(per_rep, key=lambda r: r["decode_tok_s"])[len(per_rep) // 2]
                print(format_roofline(c, roofline[str(c)]))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
        "threads": args.threads, "model": path, "quantization": args.quantization,
        "engine_weights_bytes": engines[args.concurrency[0]].weights_bytes, "num_requests": len(reqs),
        "prompt_len": list(args.prompt_len), "output_len": list(args.output_len), "output_tokens": total_out,
        "concurrency": args.concurrency, "static_batch": args.static_batch, "reps": args.reps, "seed": args.seed,
        "methods": summaries, "engine_ratio_per_rep_median": ratios,
        "mismatching_requests_vs_sequential": mismatches, "mismatch_reference": next(m for m in METHODS if m in methods),
        "quantization_comparison": quantized, "decode_roofline": roofline, "raw": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "kubeinfer_bench.json").write_text(json.dumps(report, indent=2))
    plotted = _plot(report, args.out_dir / "kubeinfer_bench.png")
    print(json.dumps({"ratios": ratios, "mismatching_requests_vs_sequential": mismatches,
                      "quantization_comparison": quantized}, indent=2))
    print(format_table(report))
    print(f"wrote {args.out_dir / 'kubeinfer_bench.json'}" + (f" and {args.out_dir / 'kubeinfer_bench.png'}"
                                                                  if plotted else ""))
    return report


if __name__ == "__main__":
    main()
