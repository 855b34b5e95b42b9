"""Prometheus metrics of the serving pod (DESIGN.md section 5), all labelled by ``model``.

Meanings follow vLLM's metrics (``vllm:num_requests_waiting`` and friends) so dashboards
and the HPA read them the same way. ``kubeinfer_queue_length`` is the autoscaling signal:
the number of requests waiting to be scheduled (not yet running) for a model.
Times are seconds, sizes are bytes, token counts are tokens.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: The registry served at ``/metrics``. A dedicated one keeps tests and embedding apps isolated
#: from the process-global default registry.
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

QUEUE_LENGTH = Gauge(
    "kubeinfer_queue_length", "Requests waiting to be scheduled (the HPA signal).", ["model"], registry=REGISTRY
)
NUM_REQUESTS_RUNNING = Gauge(
    "kubeinfer_num_requests_running", "Requests in the running batch.", ["model"], registry=REGISTRY
)
KV_CACHE_USAGE = Gauge(
    "kubeinfer_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use, 0..1.", ["model"], registry=REGISTRY
)
TTFT = Histogram(
    "kubeinfer_time_to_first_token_seconds", "Time from arrival to the first output token.",
    ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
ITL = Histogram(
    "kubeinfer_inter_token_latency_seconds", "Time between consecutive output tokens of a request.",
    ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
E2E_LATENCY = Histogram(
    "kubeinfer_e2e_request_latency_seconds", "Time from arrival to the request's end.",
    ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "kubeinfer_request_queue_time_seconds", "Time a request spent waiting before its first schedule.",
    ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "kubeinfer_prompt_tokens", "Prompt tokens processed (prefill).", ["model"], registry=REGISTRY
)
GENERATION_TOKENS = Counter(
    "kubeinfer_generation_tokens", "Output tokens generated.", ["model"], registry=REGISTRY
)
NUM_PREEMPTIONS = Counter(
    "kubeinfer_num_preemptions", "Sequences preempted for lack of KV blocks (recomputed later).",
    ["model"], registry=REGISTRY,
)
PREFIX_CACHE_QUERIES = Counter(
    "kubeinfer_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model"], registry=REGISTRY
)
PREFIX_CACHE_HITS = Counter(
    "kubeinfer_prefix_cache_hits", "Prompt tokens found in the prefix cache.", ["model"], registry=REGISTRY
)
REQUESTS_FINISHED = Counter(
    "kubeinfer_request_success", "Finished requests by finish reason (stop, length, abort).",
    ["model", "finish_reason"], registry=REGISTRY,
)
MODEL_LOADS = Counter(
    "kubeinfer_model_loads", "Model loads completed (cold or warm).", ["model"], registry=REGISTRY
)
MODEL_LOAD_FAILURES = Counter(
    "kubeinfer_model_load_failures", "Model loads that failed.", ["model"], registry=REGISTRY
)
MODEL_EVICTIONS = Counter(
    "kubeinfer_model_evictions", "Models evicted from device memory.", ["model"], registry=REGISTRY
)
MODEL_LOAD_SECONDS = Histogram(
    "kubeinfer_model_load_seconds", "Wall time of a model load.", ["model"], buckets=_LOAD_BUCKETS, registry=REGISTRY
)
MODEL_LOADED_BYTES = Gauge(
    "kubeinfer_model_loaded_bytes", "Bytes a loaded model holds (weights + KV pool); 0 when unloaded.",
    ["model"], registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "kubeinfer_auth_failures", "Requests refused for a missing or unknown API key.", ["reason"], registry=REGISTRY
)
TENANT_REQUESTS = Counter(
    "kubeinfer_tenant_requests",
    "Generation/embedding requests per tenant and outcome (admitted, rate_limited, queue_full). "
    "Tenants come from the API keys file, so the label set is bounded.",
    ["tenant", "outcome"], registry=REGISTRY,
)
TENANT_TOKENS = Counter(
    "kubeinfer_tenant_tokens", "Tokens served per tenant (kind: prompt or generation).",
    ["tenant", "kind"], registry=REGISTRY,
)
TENANT_WAITING = Gauge(
    "kubeinfer_tenant_waiting_requests", "Requests per tenant waiting for fair admission to an engine.",
    ["tenant"], registry=REGISTRY,
)
MODEL_IDLE_UNLOADS = Counter(
    "kubeinfer_model_idle_unloads", "Models unloaded after their idleTimeoutSeconds without requests.",
    ["model"], registry=REGISTRY,
)
RESULT_CACHE_REQUESTS = Counter(
    "kubeinfer_result_cache_requests", "Cacheable requests looked up in the result cache (outcome: hit or miss).",
    ["model", "outcome"], registry=REGISTRY,
)
RESULT_CACHE_BYTES = Gauge(
    "kubeinfer_result_cache_bytes", "Bytes of responses held by the result cache.", registry=REGISTRY,
)
_FETCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
MODEL_FETCH_SECONDS = Histogram(
    "kubeinfer_model_fetch_seconds", "Wall time of fetching a remote model (hf://, s3://) into the disk tier.",
    ["model"], buckets=_FETCH_BUCKETS, registry=REGISTRY,
)
MODEL_FETCH_BYTES = Counter(
    "kubeinfer_model_fetch_bytes", "Bytes fetched from remote stores into the disk tier.", ["model"], registry=REGISTRY
)
DISK_CACHE_HITS = Counter(
    "kubeinfer_disk_cache_hits", "Loads of a remote model that found it in the disk tier.", ["model"],
    registry=REGISTRY,
)
DISK_CACHE_MISSES = Counter(
    "kubeinfer_disk_cache_misses", "Loads of a remote model that had to fetch it.", ["model"], registry=REGISTRY
)
DISK_CACHE_EVICTIONS = Counter(
    "kubeinfer_disk_cache_evictions", "Snapshots deleted from the disk tier to make room (label: the model "
    "whose fetch needed the room).", ["model"], registry=REGISTRY,
)
DISK_CACHE_USAGE = Gauge(
    "kubeinfer_disk_cache_usage_bytes", "Bytes of model snapshots in the disk tier plus fetches in flight.",
    registry=REGISTRY,
)
DISK_CACHE_CAPACITY = Gauge(
    "kubeinfer_disk_cache_capacity_bytes", "Byte budget of the disk tier.", registry=REGISTRY,
)


class EngineMetrics:
    """Records an engine's :class:`~kubeinfer_serving.engine.stats.StepStats` into the metrics above.

    Attach with ``llm_engine.add_stat_logger(EngineMetrics(model_name))``; the engine itself
    holds no Prometheus handles.

    Args:
        model_name: the ``model`` label.
    """

    def __init__(self, model_name: str) -> None:
        m = model_name
        self.model_name = model_name
        self._queue = QUEUE_LENGTH.labels(model=m)
        self._running = NUM_REQUESTS_RUNNING.labels(model=m)
        self._kv = KV_CACHE_USAGE.labels(model=m)
        self._ttft = TTFT.labels(model=m)
        self._itl = ITL.labels(model=m)
        self._e2e = E2E_LATENCY.labels(model=m)
        self._qtime = QUEUE_TIME.labels(model=m)
        self._prompt = PROMPT_TOKENS.labels(model=m)
        self._gen = GENERATION_TOKENS.labels(model=m)
        self._preempt = NUM_PREEMPTIONS.labels(model=m)
        self._pq = PREFIX_CACHE_QUERIES.labels(model=m)
        self._ph = PREFIX_CACHE_HITS.labels(model=m)

    def __call__(self, stats) -> None:
        """Record one step's statistics (a ``StepStats``)."""
        self._queue.set(stats.num_waiting)
        self._running.set(stats.num_running)
        self._kv.set(stats.kv_cache_usage)
        for t in stats.queue_times:
            self._qtime.observe(t)
        if stats.prompt_tokens:
            self._prompt.inc(stats.prompt_tokens)
        if stats.generation_tokens:
            self._gen.inc(stats.generation_tokens)
        if stats.num_preemptions:
            self._preempt.inc(stats.num_preemptions)
        if stats.prefix_queries:
            self._pq.inc(stats.prefix_queries)
            self._ph.inc(stats.prefix_hits)
        for t in stats.ttfts:
            self._ttft.observe(t)
        for t in stats.itls:
            self._itl.observe(t)
        for t, reason in zip(stats.e2e_latencies, stats.finish_reasons, strict=True):
            self._e2e.observe(t)
            REQUESTS_FINISHED.labels(model=self.model_name, finish_reason=reason).inc()
