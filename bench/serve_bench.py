"""Load generator for an OpenAI-compatible server, in the manner of ``vllm bench serve``.

Sends streaming ``/v1/completions`` requests with Poisson arrivals at ``--request-rate`` (requests
per second; ``inf`` sends all at once) or at most ``--max-concurrency`` in flight, with prompt and
output lengths drawn from a seeded uniform distribution and ``ignore_eos`` so every request runs to
its ``max_tokens``. Token counts come from the server's ``usage``.

Reported (vLLM's definitions): request throughput (req/s), output-token throughput (tok/s),
TTFT (arrival to first streamed token), TPOT = (e2e - TTFT) / (output tokens - 1), ITL (gaps between
streamed chunks) and end-to-end latency, each as mean / median / P99 in seconds. Writes a JSON file
and a PNG plot (TTFT and ITL distributions).

Usage: ``python -m bench.serve_bench --base-url http://127.0.0.1:8000 --model tiny-llama --num-prompts 64``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class RequestResult:
    """Timings of one streamed request, seconds since its own send time."""

    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _word_prompt(rng: random.Random, n_words: int) -> str:
    """A prompt of ``n_words`` pseudo-words; with a BPE tokenizer that is roughly n_words..2*n_words tokens."""
    vocab = ["river", "stone", "light", "model", "token", "cache", "block", "queue", "batch", "graph",
             "north", "winter", "paper", "signal", "garden", "engine", "yellow", "market", "window", "letter"]
    return " ".join(rng.choice(vocab) for _ in range(n_words))


async def _one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                       api_key: str | None = None) -> RequestResult:
    """Send one streaming completion (with ``Authorization: Bearer api_key`` when given) and time its chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = RequestResult(ok=False, prompt_len=0)
    last = start
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = True
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    return result


def _summary(values: list[float]) -> dict[str, float]:
    """Mean, median and P99 of ``values`` (seconds); zeros when empty."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p99": p99}


async def run_benchmark(args: argparse.Namespace) -> dict:
    """Drive the server with the configured workload and return the report dict."""
    rng = random.Random(args.seed)
    workload = [(_word_prompt(rng, rng.randint(args.min_prompt_words, args.max_prompt_words)),
                 rng.randint(args.min_output_tokens, args.max_output_tokens)) for _ in range(args.num_prompts)]
    limits = httpx.Limits(max_connections=max(args.max_concurrency or args.num_prompts, 1) + 4)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits) as client:
        keys = args.api_key or [None]

        async def guarded(prompt: str, max_tokens: int, key: str | None) -> RequestResult:
            if sem is None:
                return await _one_request(client, args.model, prompt, max_tokens, key)
            async with sem:
                return await _one_request(client, args.model, prompt, max_tokens, key)

        tasks = []
        start = time.perf_counter()
        for i, (prompt, max_tokens) in enumerate(workload):
            tasks.append(asyncio.create_task(guarded(prompt, max_tokens, keys[i % len(keys)])))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    report = {
        "config": {k: (str(v) if isinstance(v, float) and v == float("inf") else v) for k, v in vars(args).items()
                   if k != "api_key"},
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_len for r in ok),
        "ttft_s": _summary([r.ttft for r in ok]),
        "tpot_s": _summary(tpot),
        "itl_s": _summary([x for r in ok for x in r.itl]),
        "e2e_s": _summary([r.e2e for r in ok]),
        "requests": [asdict(r) for r in results] if args.keep_requests else [],
    }
    return report


def _plot(report: dict, ttfts: list[float], itls: list[float], path: Path) -> None:
    """Histogram of TTFT and ITL in milliseconds, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].hist([t * 1e3 for t in ttfts], bins=30, color="tab:blue")
    axes[0].set_title("TTFT (ms)")
    axes[1].hist([t * 1e3 for t in itls], bins=30, color="tab:orange")
    axes[1].set_title("ITL (ms)")
    fig.suptitle(f"{report['completed']} requests, {report['output_token_throughput']:.0f} output tok/s")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; prints the summary and writes JSON + PNG into ``--out-dir``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=0, help="cap on requests in flight; 0 = no cap")
    p.add_argument("--min-prompt-words", type=int, default=8)
    p.add_argument("--max-prompt-words", type=int, default=128)
    p.add_argument("--min-output-tokens", type=int, default=8)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--api-key", action="append", default=[],
                   help="API key sent as Authorization: Bearer; repeat it to spread requests round-robin over tenants")
    p.add_argument("--keep-requests", action="store_true", help="store every request's timings in the JSON")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    keep = args.keep_requests
    args.keep_requests = True  # the plot needs every request; they are dropped from the JSON unless asked for
    report = asyncio.run(run_benchmark(args))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in report["requests"] if r["ok"]]
    _plot(report, [r["ttft"] for r in ok], [x for r in ok for x in r["itl"]], args.out_dir / "serve_bench.png")
    if not keep:
        report["requests"] = []
    (args.out_dir / "serve_bench.json").write_text(json.dumps(report, indent=2, default=str))
    for key in ("completed", "failed", "duration_s", "request_throughput", "output_token_throughput"):
        print(f"{key:>24}: {report[key]}")
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        s = report[key]
        print(f"{key:>24}: mean {s['mean']*1e3:.1f} ms  median {s['median']*1e3:.1f} ms  p99 {s['p99']*1e3:.1f} ms")
    if report["errors"]:
        print("errors:", report["errors"])


if __name__ == "__main__":
    main()
