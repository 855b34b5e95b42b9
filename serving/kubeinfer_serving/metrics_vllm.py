"""vLLM's metric names (``--metrics-names vllm`` or ``both``): the engine series under ``vllm:`` names,
labels and buckets, so vLLM's dashboards, inference-perf's vLLM reader, the Gateway API Inference
Extension's defaults and production-stack's KEDA triggers read this pod unchanged.

Names, labels (``model_name``, ``engine``; ``finished_reason`` on ``vllm:request_success_total``)
and buckets follow vLLM v1's Prometheus logger (vllm/v1/metrics/loggers.py); ``engine`` is
always ``"0"`` (one engine per model here). With ``vllm`` the overlapping ``kubeinfer_*`` engine
series (:data:`kubeinfer_serving.metrics.ENGINE_SERIES`) are not exported; the pod-level ones
(model state, HTTP, tenants, registry, disk tier) and ``kubeinfer_queue_length`` (the operator's
autoscaling signal) keep their names in every mode.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_LABELS = ["model_name", "engine"]
ENGINE = "0"
#: vLLM's buckets (seconds / tokens).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class VllmSeries:
    """The ``vllm:`` series, registered in ``registry`` (the one ``/metrics`` serves)."""

    def __init__(self, registry: Any) -> None:  # noqa: ANN401 - a prometheus_client CollectorRegistry
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=registry)

        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                             _LABELS, registry=registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                             _LABELS, registry=registry)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                              _LABELS, registry=registry)
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                   _LABELS, registry=registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", _LABELS,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         _LABELS, registry=registry)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", _LABELS,
                                      registry=registry)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", _LABELS,
                                   registry=registry)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               [*_LABELS, "finished_reason"], registry=registry)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        TPOT_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                          REQUEST_LATENCY_BUCKETS)
        self.inference = hist("vllm:request_inference_time_seconds",
                              "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill = hist("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for "
                            "request.", REQUEST_LATENCY_BUCKETS)
        self.decode = hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                           REQUEST_LATENCY_BUCKETS)
        self.req_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS)
        self.req_generation = hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                   TOKEN_BUCKETS)

    def record_step(self, model_name: str, stats: Any) -> None:  # noqa: ANN401
        """Record one engine step's :class:`~kubeinfer_serving.engine.stats.StepStats`."""
        lv = (model_name, ENGINE)
        self.waiting.labels(*lv).set(stats.num_waiting)
        self.running.labels(*lv).set(stats.num_running)
        self.kv_usage.labels(*lv).set(stats.kv_cache_usage)
        for t in stats.queue_times:
            self.queue.labels(*lv).observe(t)
        if stats.prompt_tokens:
            self.prompt_tokens.labels(*lv).inc(stats.prompt_tokens)
        if stats.generation_tokens:
            self.generation_tokens.labels(*lv).inc(stats.generation_tokens)
        if stats.num_preemptions:
            self.preemptions.labels(*lv).inc(stats.num_preemptions)
        if stats.prefix_queries:
            self.prefix_queries.labels(*lv).inc(stats.prefix_queries)
            self.prefix_hits.labels(*lv).inc(stats.prefix_hits)
        for t in stats.ttfts:
            self.ttft.labels(*lv).observe(t)
        for t in stats.itls:
            self.itl.labels(*lv).observe(t)
        for t, reason in zip(stats.e2e_latencies, stats.finish_reasons, strict=True):
            self.e2e.labels(*lv).observe(t)
            self.success.labels(*lv, reason).inc()

    def record_finished(self, model_name: str, out: Any) -> None:  # noqa: ANN401
        """Record a finished request's token counts and phase times (see
        :func:`kubeinfer_serving.metrics.record_finished_request` for ``out``)."""
        lv = (model_name, ENGINE)
        self.req_prompt.labels(*lv).observe(out.num_prompt_tokens)
        self.req_generation.labels(*lv).observe(out.num_output_tokens)
        t = getattr(out, "timings", None)
        if t is None:
            return
        if t.first_scheduled is not None and t.first_token is not None:
            self.prefill.labels(*lv).observe(max(0.0, t.first_token - t.first_scheduled))
        if t.first_token is not None and t.last_token is not None:
            self.decode.labels(*lv).observe(max(0.0, t.last_token - t.first_token))
            if out.num_output_tokens > 1:
                self.tpot.labels(*lv).observe(max(0.0, t.last_token - t.first_token) / (out.num_output_tokens - 1))
        if t.first_scheduled is not None and t.last_token is not None:
            self.inference.labels(*lv).observe(max(0.0, t.last_token - t.first_scheduled))
