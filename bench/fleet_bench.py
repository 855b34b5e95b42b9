"""Fleet benchmark: random spreading (what a Kubernetes Service does) vs ``kubeinfer-router`` (issue 18).

Starts a loopback fleet (:mod:`bench.fleet`): ``--pods`` real ``kubeinfer-serve`` processes with
the same catalogue of ``--models`` copies of the built-in tiny model (``maxLoadedModels: 1``, a
small KV pool per model), one router over all pods and one over the first pod only. Every request
is a streamed ``/v1/completions`` with ``ignore_eos`` and greedy sampling, sent with ``httpx``.

Workloads (each routing runs the same seeded request sequence):

(a) **fleet**: requests over ``--models`` models at random, ``--concurrency`` in flight, from a
    clean start (every model unloaded): routed to a random pod, model i to pod i (the ideal), and
    through the router. Reported: model loads (``kubeinfer_model_loads_total`` summed over the
    pods), wall time, p50/p99 end-to-end latency.
(b) **shared prefixes**: ``--prefix-groups`` groups that each share a ``--prefix-tokens``-token
    system prompt (counted with the model's tokenizer), each request adding a unique question,
    ``--prefix-requests`` requests per group in a shuffled order; one model loaded on every pod.
    That model has a KV pool of its own, sized relative to the prompts: room for each pod's share of
    the running requests plus a cache of ``--prefix-kv-share`` of all groups' prefixes (default
    ``1 / --pods``: each pod can cache its share of the groups' prompts, the fleet's pools together
    every group once, so ideal placement fits and random spreading cannot; this is the regime
    prefix-aware routing is for; a pool that caches every group on every pod leaves random
    spreading only its first miss per group and pod, and no router can double that). Reported: the pods' summed prefix-cache hit
    rate (``kubeinfer_prefix_cache_hits_total`` / ``..._queries_total``), output tokens/s, and
    where each group's requests went, random vs router on the same request sequence (each run
    with prompts of its own, so neither finds the other's prefixes cached).
(c) **unique prompts** (control): output tokens/s random vs router, and the most requests any
    endpoint held at once (from each response's ``x-kubeinfer-endpoint`` and its start/end times)
    against the CHWBL bound ``ceil(concurrency / pods * 1.25)``.
(d) **overhead**: ``--streams`` concurrent streams direct to one pod vs through a router whose only
    endpoint is that pod, alternating ``--overhead-reps`` times: output tokens/s ratio and the
    added median time to first token (median over the reps of each rep's median), next to the
    router's own mean overhead per request (its ``kubeinfer_router_proxy_overhead_seconds``); then
    ``--probe-requests`` single requests, alternating direct and through the router, one at a
    time: the added median time to first token of a lone request (no batching noise).

``--workloads`` picks some of ``fleet,prefix,unique,overhead`` (default all). ``--pin`` (at least 2
CPUs) runs the routers alone on the last CPU and the pods and this client on the others, as in a
cluster where the router has pods (and CPUs) of its own and the clients are elsewhere: the
client's CPU time then weighs on the pods equally in both arms of every comparison, and neither
the router nor the client slows the other down (with the client on the routers' CPU, a burst of
64 streams made each wait for the other, which no deployment does); without it every process
shares every core.

Writes ``fleet_bench.json`` into ``--out-dir`` (default ``bench/results/fleet``) and prints a table.
The machine is shared and noisy: compare the ratios of side-by-side runs, not absolute times.

Usage: ``python -m bench.fleet_bench`` (full size) or ``python -m bench.fleet_bench --smoke`` (CI size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.fleet import Fleet, counter, kv_bytes_per_token, model_names, tokenizer

#: The routers' ``--load-factor`` (the spec's default), for the bound reported in (c).
LOAD_FACTOR = 1.25
#: KV tokens a running shared-prefix request needs beyond its prefix (question, output, a partial block).
TAIL_TOKENS = 64
#: Seconds to let the routers' pollers see a change made behind their back (unloads, preloads).
SETTLE_SECONDS = 2.5
_WORDS = ["river", "stone", "light", "model", "token", "cache", "block", "queue", "batch", "graph", "north",
          "winter", "paper", "signal", "garden", "engine", "yellow", "market", "window", "letter", "silver",
          "forest", "castle", "orange", "bridge", "planet", "number", "summer", "mirror", "pocket"]


@dataclass
class Result:
    """One streamed completion. Times are ``time.perf_counter`` seconds; ``ttft``/``e2e`` since ``start``."""

    ok: bool
    endpoint: str
    start: float
    route: str = ""
    end: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class Job:
    """One request to send: where, which model, the prompt and ``max_tokens``."""

    base_url: str
    model: str
    prompt: str
    max_tokens: int


def words(rng: random.Random, n: int) -> str:
    """``n`` pseudo-words (the tiny model's tokenizer makes roughly 1.3-1.5 tokens of each)."""
    return " ".join(rng.choice(_WORDS) for _ in range(n))


async def stream_one(client: httpx.AsyncClient, job: Job) -> Result:
    """Send ``job`` as a streamed completion; never raises (a failure is ``ok=False`` with the error)."""
    body = {"model": job.model, "prompt": job.prompt, "max_tokens": job.max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True}}
    res = Result(ok=False, endpoint=job.base_url, start=time.perf_counter())
    try:
        async with client.stream("POST", f"{job.base_url}/v1/completions", json=body) as resp:
            res.endpoint = resp.headers.get("x-kubeinfer-endpoint", job.base_url)
            res.route = resp.headers.get("x-kubeinfer-route", "")
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                if chunk.get("choices") and not res.ttft:
                    res.ttft = time.perf_counter() - res.start
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
            res.ok = done and res.tokens > 0
            res.error = "" if res.ok else "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = repr(exc)[:200]
    finally:
        res.end = time.perf_counter()
        res.e2e = res.end - res.start
    return res


async def run_jobs(jobs: list[Job], concurrency: int) -> tuple[list[Result], float]:
    """Send ``jobs`` in order with at most ``concurrency`` in flight; returns the results (in job order)
    and the wall time in seconds."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
        async def one(job: Job) -> Result:
            async with sem:
                return await stream_one(client, job)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(j) for j in jobs))
    return list(results), time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear interpolation (numpy's default); 0.0 when empty."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(results: list[Result], wall: float) -> dict:
    """Wall time, output tokens/s, latency and TTFT percentiles (seconds) and the failures of one run."""
    ok = [r for r in results if r.ok]
    return {
        "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
        "output_tok_s": sum(r.tokens for r in ok) / wall if wall > 0 else 0.0,
        "latency_p50_s": percentile([r.e2e for r in ok], 0.5), "latency_p99_s": percentile([r.e2e for r in ok], 0.99),
        "ttft_p50_s": percentile([r.ttft for r in ok], 0.5),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def max_inflight(results: list[Result]) -> dict[str, int]:
    """Per endpoint, the most requests the client had on it at once (overlap of their [start, end]
    intervals). An upper bound of the router's own count: the router counts a request done when it
    has written the last byte, which a client on a busy machine reads later."""
    events: dict[str, list[tuple[float, int]]] = {}
    for r in results:
        events.setdefault(r.endpoint, []).extend([(r.start, 1), (r.end, -1)])
    out = {}
    for endpoint, evs in events.items():
        cur = peak = 0
        for _, delta in sorted(evs, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
            cur += delta
            peak = max(peak, cur)
        out[endpoint] = peak
    return out


def placement(results: list[Result], groups: list[int]) -> dict:
    """Where each prefix group's requests went: ``endpoints_per_group`` (group -> endpoint -> requests),
    the mean number of endpoints a group touched, and the router's decision reasons (when it set them)."""
    per_group: dict[int, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    for r, g in zip(results, groups, strict=True):
        where = per_group.setdefault(g, {})
        where[r.endpoint] = where.get(r.endpoint, 0) + 1
        if r.route:
            reasons[r.route] = reasons.get(r.route, 0) + 1
    spread = statistics.mean(len(v) for v in per_group.values()) if per_group else 0.0
    return {"endpoints_per_group": {str(g): per_group[g] for g in sorted(per_group)},
            "mean_endpoints_per_group": spread, "route_reasons": reasons}


def route_random(urls: list[str], seed: int) -> Callable[[int, str], str]:
    """A Service's spreading: each request to a pod chosen at random (seeded apart from the workload's
    own draws, which use the integer seeds: the same stream would send model i to pod i)."""
    rng = random.Random(f"route-{seed}")
    return lambda i, model: rng.choice(urls)


def route_fixed(url: str) -> Callable[[int, str], str]:
    """Every request to ``url`` (a router, or one pod)."""
    return lambda i, model: url


def route_ideal(urls: list[str], models: list[str]) -> Callable[[int, str], str]:
    """Model i always to pod i (mod the pod count): the placement a perfect router would find."""
    return lambda i, model: urls[models.index(model) % len(urls)]


def preload_everywhere(fleet: Fleet, model: str) -> None:
    """Load ``model`` on every pod (evicting the others), then let the routers see it."""
    for url in fleet.urls:
        httpx.post(f"{url}/admin/models/{model}/load", timeout=120).raise_for_status()
    time.sleep(SETTLE_SECONDS)


def warm_up(fleet: Fleet, models: list[str]) -> None:
    """One short request per model on every pod (each load evicts the previous model), so the first
    measured routing does not pay the processes' first-request costs alone."""
    for url in fleet.urls:
        jobs = [Job(url, m, "warm up", 2) for m in models]
        for job in jobs:
            results, _ = asyncio.run(run_jobs([job], 1))
            if not results[0].ok:
                raise RuntimeError(f"warm-up request to {url} for {job.model} failed: {results[0].error}")


def workload_fleet(fleet: Fleet, router: str, args: argparse.Namespace) -> dict:
    """(a): loads, wall time and latency of the multi-model workload per routing (after :func:`warm_up`)."""
    models = model_names(args.models)
    warm_up(fleet, models)
    rng = random.Random(args.seed)
    picks = [rng.choice(models) for _ in range(args.fleet_requests)]
    prompts = [words(rng, 12) for _ in picks]
    routings = {"random": route_random(fleet.urls, args.seed), "ideal": route_ideal(fleet.urls, models),
                "router": route_fixed(router)}
    out = {}
    for name, route in routings.items():
        fleet.unload_all()
        time.sleep(SETTLE_SECONDS)
        loads0 = fleet.total("kubeinfer_model_loads_total")
        jobs = [Job(route(i, m), m, p, args.max_tokens) for i, (m, p) in enumerate(zip(picks, prompts, strict=True))]
        results, wall = asyncio.run(run_jobs(jobs, args.concurrency))
        out[name] = {"model_loads": int(fleet.total("kubeinfer_model_loads_total") - loads0), **summary(results, wall)}
    return out


def sized_text(tok, rng: random.Random, head: str, tokens: int) -> str:
    """``head`` and pseudo-words, just enough for ``tokens`` tokens of ``tok`` (a few more at most)."""
    text = head
    while (have := len(tok.encode(text, add_special_tokens=False).ids)) < tokens:
        text += " " + words(rng, max(1, (tokens - have) // 3))
    return text


def prefix_model(args: argparse.Namespace) -> str:
    """The model of workload (b): the catalogue's last (it has the KV pool of :func:`prefix_pool_bytes`)."""
    return model_names(args.models)[-1]


def prefix_pool_bytes(args: argparse.Namespace) -> int:
    """The KV pool of :func:`prefix_model`: each pod's share of the running requests (prefix and tail
    each) plus ``--prefix-kv-share`` of every group's prefix, in bytes."""
    running = math.ceil(args.concurrency / args.pods) * (args.prefix_tokens + TAIL_TOKENS)
    cached = math.ceil(args.prefix_kv_share * args.prefix_groups * args.prefix_tokens)
    return (running + cached) * kv_bytes_per_token()


def workload_prefix(fleet: Fleet, router: str, args: argparse.Namespace) -> dict:
    """(b): summed prefix-cache hit rate and throughput with shared system prompts, random vs router."""
    model = prefix_model(args)
    preload_everywhere(fleet, model)
    tok = tokenizer()
    out = {}
    for run, (name, route) in enumerate({"random": route_random(fleet.urls, args.seed),
                                         "router": route_fixed(router)}.items()):
        rng = random.Random(args.seed * 100 + run)  # fresh prefixes per run: the other run's cache cannot help
        systems = [sized_text(tok, rng, f"System prompt {run}-{g}:", args.prefix_tokens)
                   for g in range(args.prefix_groups)]
        order = [g for g in range(args.prefix_groups) for _ in range(args.prefix_requests)]
        random.Random(f"order-{args.seed}").shuffle(order)
        jobs = [Job(route(i, model), model, f"{systems[g]}\nQuestion: {words(rng, 10)}", args.max_tokens)
                for i, g in enumerate(order)]
        hits0, queries0 = fleet.total("kubeinfer_prefix_cache_hits_total"), fleet.total("kubeinfer_prefix_cache_queries_total")
        results, wall = asyncio.run(run_jobs(jobs, args.concurrency))
        hits = fleet.total("kubeinfer_prefix_cache_hits_total") - hits0
        queries = fleet.total("kubeinfer_prefix_cache_queries_total") - queries0
        out[name] = {"prefix_hit_rate": hits / queries if queries else 0.0, "prefix_hit_tokens": int(hits),
                     "prompt_tokens_looked_up": int(queries), **placement(results, order), **summary(results, wall)}
    return out


def workload_unique(fleet: Fleet, router: str, args: argparse.Namespace) -> dict:
    """(c): throughput with unique prompts, random vs router, and the most in flight per endpoint."""
    model = model_names(args.models)[0]
    preload_everywhere(fleet, model)
    rng = random.Random(args.seed + 7)
    prompts = [f"{i} " + words(rng, args.unique_words) for i in range(args.unique_requests)]
    bound = math.ceil(args.concurrency / len(fleet.urls) * LOAD_FACTOR)
    out = {}
    for name, route in {"random": route_random(fleet.urls, args.seed), "router": route_fixed(router)}.items():
        jobs = [Job(route(i, model), model, p, args.max_tokens) for i, p in enumerate(prompts)]
        results, wall = asyncio.run(run_jobs(jobs, args.concurrency))
        peaks = max_inflight([r for r in results if r.ok])
        out[name] = {"max_inflight_per_endpoint": peaks, "bound": bound, **summary(results, wall)}
    return out


def workload_overhead(fleet: Fleet, single_router: str, args: argparse.Namespace) -> dict:
    """(d): ``--streams`` concurrent streams direct to pod 0 vs through a router over pod 0 only."""
    model = model_names(args.models)[0]
    preload_everywhere(fleet, model)
    rng = random.Random(args.seed + 11)
    prompts = [f"{i} " + words(rng, 12) for i in range(args.streams)]
    runs: dict[str, list[dict]] = {"direct": [], "router": []}
    sums0 = {n: counter(single_router, f"kubeinfer_router_proxy_overhead_seconds_{n}") for n in ("sum", "count")}
    for _ in range(args.overhead_reps):
        for name, url in (("direct", fleet.urls[0]), ("router", single_router)):
            jobs = [Job(url, model, p, args.overhead_tokens) for p in prompts]
            results, wall = asyncio.run(run_jobs(jobs, args.streams))
            runs[name].append(summary(results, wall))
    sums = {n: counter(single_router, f"kubeinfer_router_proxy_overhead_seconds_{n}") - sums0[n]
            for n in ("sum", "count")}
    probe: dict[str, list[float]] = {"direct": [], "router": []}
    for i in range(args.probe_requests):
        for name, url in (("direct", fleet.urls[0]), ("router", single_router)):
            results, _ = asyncio.run(run_jobs([Job(url, model, f"probe {i} " + words(rng, 12), 4)], 1))
            if results[0].ok:
                probe[name].append(results[0].ttft)
    med = {k: {"output_tok_s": statistics.median(r["output_tok_s"] for r in v),
               "ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in v)} for k, v in runs.items()}
    return {
        "runs": runs, "median": med,
        "tok_s_ratio_router_vs_direct": med["router"]["output_tok_s"] / med["direct"]["output_tok_s"],
        "added_median_ttft_ms": 1000 * (med["router"]["ttft_p50_s"] - med["direct"]["ttft_p50_s"]),
        "router_mean_proxy_overhead_ms": 1000 * sums["sum"] / sums["count"] if sums["count"] else None,
        "probe_ttft_p50_ms": {k: 1000 * statistics.median(v) if v else None for k, v in probe.items()},
        "probe_added_median_ttft_ms": (1000 * (statistics.median(probe["router"]) - statistics.median(probe["direct"]))
                                       if probe["router"] and probe["direct"] else None),
    }


#: The workloads, in the order they run.
WORKLOADS = ("fleet", "prefix", "unique", "overhead")


def verdicts(report: dict) -> dict:
    """The issue's targets, each True when this run met it."""
    out: dict[str, bool] = {}
    if a := report.get("fleet"):
        out["fleet_loads_le_1.2x_models"] = a["router"]["model_loads"] <= 1.2 * report["config"]["models"]
        out["fleet_wall_le_1.3x_ideal"] = a["router"]["wall_s"] <= 1.3 * a["ideal"]["wall_s"]
    if b := report.get("prefix"):
        out["prefix_hit_rate_ge_2x_random"] = b["router"]["prefix_hit_rate"] >= 2 * b["random"]["prefix_hit_rate"]
        out["prefix_throughput_not_lower"] = b["router"]["output_tok_s"] >= b["random"]["output_tok_s"]
    if c := report.get("unique"):
        out["unique_throughput_within_5pct"] = c["router"]["output_tok_s"] >= 0.95 * c["random"]["output_tok_s"]
        out["unique_client_seen_peak_le_bound"] = (
            max(c["router"]["max_inflight_per_endpoint"].values(), default=0) <= c["router"]["bound"])
    if d := report.get("overhead"):
        out["overhead_tok_s_ge_95pct"] = d["tok_s_ratio_router_vs_direct"] >= 0.95
        out["overhead_added_ttft_lt_3ms"] = d["added_median_ttft_ms"] < 3.0
    return out


def print_table(report: dict) -> None:
    """The report's workloads as plain-text tables."""
    if a := report.get("fleet"):
        print("\n(a) fleet: routing | model loads | wall s | p50 s | p99 s | failed")
        for k, v in a.items():
            print(f"  {k:7s} | {v['model_loads']:4d} | {v['wall_s']:7.2f} | {v['latency_p50_s']:6.3f} | "
                  f"{v['latency_p99_s']:6.3f} | {v['failed']}")
    if b := report.get("prefix"):
        print("(b) shared prefixes: routing | prefix hit rate | output tok/s | failed")
        for k, v in b.items():
            print(f"  {k:7s} | {v['prefix_hit_rate']:.3f} | {v['output_tok_s']:8.1f} | {v['failed']}")
    if c := report.get("unique"):
        print("(c) unique prompts: routing | output tok/s | max in flight per endpoint (bound) | failed")
        for k, v in c.items():
            print(f"  {k:7s} | {v['output_tok_s']:8.1f} | {sorted(v['max_inflight_per_endpoint'].values())} "
                  f"({v['bound']}) | {v['failed']}")
    if d := report.get("overhead"):
        print(f"(d) overhead, {report['config']['streams']} streams: tok/s router/direct "
              f"{d['tok_s_ratio_router_vs_direct']:.3f}, added median TTFT {d['added_median_ttft_ms']:.2f} ms, "
              f"router's own mean proxy overhead {d['router_mean_proxy_overhead_ms'] or 0:.2f} ms; one request at a "
              f"time: added median TTFT {d['probe_added_median_ttft_ms'] or 0:.2f} ms")
    print("targets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in report["targets"].items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--smoke", action="store_true", help="CI size: few requests, short prompts")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results/fleet"))
    p.add_argument("--pods", type=int, default=3)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens of (a)-(c) requests")
    p.add_argument("--fleet-requests", type=int, default=60)
    p.add_argument("--prefix-groups", type=int, default=8)
    p.add_argument("--prefix-requests", type=int, default=12,
                   help="requests per prefix group (enough that a group's first misses amortise)")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="tokens of each group's shared system prompt")
    p.add_argument("--prefix-kv-share", type=float, default=None,
                   help="(b)'s KV pool per pod caches this share of all groups' prefixes, besides its running "
                        "requests (default 1 / pods: the fleet's pools together cache every group once)")
    p.add_argument("--router-flags", default="",
                   help="more kubeinfer-router flags for the fleet's router (e.g. '--load-factor 2'); not the "
                        "overhead workload's")
    p.add_argument("--unique-requests", type=int, default=48)
    p.add_argument("--unique-words", type=int, default=150)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--overhead-tokens", type=int, default=48)
    p.add_argument("--overhead-reps", type=int, default=5)
    p.add_argument("--probe-requests", type=int, default=40,
                   help="(d): lone requests per arm, alternating direct and through the router")
    p.add_argument("--kv-cache-bytes", type=int, default=24 * 1024**2,
                   help="KV pool of every model but (b)'s (which --prefix-kv-share sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--pin", action="store_true",
                   help="routers alone on the last CPU, the pods and this client on the others")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.prefix_kv_share is None:
        args.prefix_kv_share = 1 / args.pods
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; pick from {','.join(WORKLOADS)}")
    if args.smoke:
        args.fleet_requests, args.prefix_groups, args.prefix_requests, args.prefix_tokens = 9, 2, 3, 200
        args.unique_requests, args.unique_words, args.streams, args.overhead_reps = 6, 30, 8, 1
        args.probe_requests = 2
        args.max_tokens, args.overhead_tokens, args.concurrency = 4, 8, 3
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the four workloads on a fresh fleet; returns the report (also written as JSON)."""
    args = parse_args(argv)
    pod_cpus = router_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        pod_cpus, router_cpus = frozenset(cpus[:-1]), frozenset(cpus[-1:])
        os.sched_setaffinity(0, pod_cpus)
    args.prefix_kv_pool_bytes = prefix_pool_bytes(args)
    with Fleet(pods=args.pods, models=args.models, kv_cache_bytes=args.kv_cache_bytes,
               kv_overrides={prefix_model(args): args.prefix_kv_pool_bytes}, pod_cpus=pod_cpus, router_cpus=router_cpus) as fleet:
        router = fleet.router(None, *args.router_flags.split())
        single = fleet.router([fleet.urls[0]])
        report: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        for name in args.workloads:
            if name == "overhead":
                report[name] = workload_overhead(fleet, single, args)
            else:
                report[name] = {"fleet": workload_fleet, "prefix": workload_prefix,
                                "unique": workload_unique}[name](fleet, router, args)
    report["targets"] = verdicts(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "fleet_bench.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


if __name__ == "__main__":
    main()
