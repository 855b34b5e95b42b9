"""Prometheus metrics of the serving pod (DESIGN.md section 5), labelled by ``model_name`` as vLLM's are.

Meanings follow vLLM's metrics (``vllm:num_requests_waiting`` and friends) so dashboards
and the HPA read them the same way; serving/README.md has the name mapping. ``kubeinfer_queue_length``
is the autoscaling signal: the number of requests waiting to be scheduled (not yet running) for
a model. Times are seconds, sizes are bytes, token counts are tokens. Besides the engine's
series: HTTP requests by route and status (:class:`HTTPMetricsMiddleware`), the process
collector's ``process_*`` series, per-request token and phase-time histograms
(:func:`record_finished_request`) and the per-model state gauge (:class:`ModelStateCollector`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubeinfer_serving.asgi_status import StatusRecorder
from kubeinfer_serving.metrics_vllm import VllmSeries

#: The registry served at ``/metrics``. A dedicated one keeps tests and embedding apps isolated
#: from the process-global default registry.
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

QUEUE_LENGTH = Gauge(
    "kubeinfer_queue_length", "Requests waiting to be scheduled (the HPA signal).", ["model_name"], registry=REGISTRY
)
NUM_REQUESTS_RUNNING = Gauge(
    "kubeinfer_num_requests_running", "Requests in the running batch.", ["model_name"], registry=REGISTRY
)
KV_CACHE_USAGE = Gauge(
    "kubeinfer_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use, 0..1.", ["model_name"], registry=REGISTRY
)
TTFT = Histogram(
    "kubeinfer_time_to_first_token_seconds", "Time from arrival to the first output token.",
    ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
ITL = Histogram(
    "kubeinfer_inter_token_latency_seconds", "Time between consecutive output tokens of a request.",
    ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
E2E_LATENCY = Histogram(
    "kubeinfer_e2e_request_latency_seconds", "Time from arrival to the request's end.",
    ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "kubeinfer_request_queue_time_seconds", "Time a request spent waiting before its first schedule.",
    ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "kubeinfer_prompt_tokens", "Prompt tokens processed (prefill).", ["model_name"], registry=REGISTRY
)
GENERATION_TOKENS = Counter(
    "kubeinfer_generation_tokens", "Output tokens generated.", ["model_name"], registry=REGISTRY
)
NUM_PREEMPTIONS = Counter(
    "kubeinfer_num_preemptions", "Sequences preempted for lack of KV blocks (recomputed later).",
    ["model_name"], registry=REGISTRY,
)
PREFIX_CACHE_QUERIES = Counter(
    "kubeinfer_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model_name"], registry=REGISTRY
)
PREFIX_CACHE_HITS = Counter(
    "kubeinfer_prefix_cache_hits", "Prompt tokens found in the prefix cache.", ["model_name"], registry=REGISTRY
)
REQUESTS_FINISHED = Counter(
    "kubeinfer_request_success", "Finished requests by finish reason (stop, length, abort).",
    ["model_name", "finish_reason"], registry=REGISTRY,
)
MODEL_LOADS = Counter(
    "kubeinfer_model_loads", "Model loads completed (cold or warm).", ["model_name"], registry=REGISTRY
)
MODEL_LOAD_FAILURES = Counter(
    "kubeinfer_model_load_failures", "Model loads that failed.", ["model_name"], registry=REGISTRY
)
MODEL_EVICTIONS = Counter(
    "kubeinfer_model_evictions", "Models evicted from device memory.", ["model_name"], registry=REGISTRY
)
MODEL_LOAD_SECONDS = Histogram(
    "kubeinfer_model_load_seconds", "Wall time of a model load.", ["model_name"], buckets=_LOAD_BUCKETS, registry=REGISTRY
)
MODEL_LOADED_BYTES = Gauge(
    "kubeinfer_model_loaded_bytes", "Bytes a loaded model holds (weights + KV pool); 0 when unloaded.",
    ["model_name"], registry=REGISTRY,
)

LORA_REQUESTS_RUNNING = Gauge(
    "kubeinfer_lora_requests_running", "Requests running with each LoRA adapter (vLLM's lora_requests_info).",
    ["model_name", "lora_name"], registry=REGISTRY,
)
LORA_REQUESTS_WAITING = Gauge(
    "kubeinfer_lora_requests_waiting", "Requests waiting with each LoRA adapter (vLLM's lora_requests_info).",
    ["model_name", "lora_name"], registry=REGISTRY,
)
LORA_SLOT_LOADS = Counter(
    "kubeinfer_lora_slot_loads", "LoRA adapters written into a device slot of a model.", ["model_name"],
    registry=REGISTRY,
)
LORA_SLOT_EVICTIONS = Counter(
    "kubeinfer_lora_slot_evictions", "LoRA adapters displaced from a device slot (LRU among idle adapters).",
    ["model_name"], registry=REGISTRY,
)

_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

REQUEST_PROMPT_TOKENS = Histogram(
    "kubeinfer_request_prompt_tokens", "Prompt length of each finished request, in tokens.",
    ["model_name"], buckets=_TOKEN_BUCKETS, registry=REGISTRY,
)
REQUEST_GENERATION_TOKENS = Histogram(
    "kubeinfer_request_generation_tokens", "Output tokens of each finished request.",
    ["model_name"], buckets=_TOKEN_BUCKETS, registry=REGISTRY,
)
REQUEST_PREFILL_TIME = Histogram(
    "kubeinfer_request_prefill_time_seconds",
    "Per request: first schedule to first output token (the prefill phase, queueing excluded).",
    ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
REQUEST_DECODE_TIME = Histogram(
    "kubeinfer_request_decode_time_seconds", "Per request: first to last output token (the decode phase).",
    ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "kubeinfer_http_requests", "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"], registry=REGISTRY,
)
HTTP_REQUEST_DURATION = Histogram(
    "kubeinfer_http_request_duration_seconds", "Time from request start to the end of the response body.",
    ["route", "method"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
#: The kubeinfer_* engine series that ``--metrics-names vllm`` replaces by vLLM's (:mod:`.metrics_vllm`);
#: ``kubeinfer_queue_length`` stays in every mode: the operator's autoscalers scale on it.
ENGINE_SERIES = (NUM_REQUESTS_RUNNING, KV_CACHE_USAGE, TTFT, ITL, E2E_LATENCY, QUEUE_TIME, PROMPT_TOKENS,
                 GENERATION_TOKENS, NUM_PREEMPTIONS, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, REQUESTS_FINISHED,
                 REQUEST_PROMPT_TOKENS, REQUEST_GENERATION_TOKENS, REQUEST_PREFILL_TIME, REQUEST_DECODE_TIME)
#: vLLM-named engine series, when ``--metrics-names`` is ``vllm`` or ``both`` (:func:`configure_names`).
_VLLM: VllmSeries | None = None


def configure_names(mode: str) -> None:
    """Choose the engine series' names, once per process, before any engine runs.

    Args:
        mode: ``kubeinfer`` (ours only, the default), ``vllm`` (vLLM's instead of the overlapping
            kubeinfer_* engine series) or ``both``.
    """
    global _VLLM
    if mode in ("vllm", "both") and _VLLM is None:
        _VLLM = VllmSeries(REGISTRY)
    if mode == "vllm":
        for series in ENGINE_SERIES:
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(series)


#: process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... (Linux /proc).
PROCESS = ProcessCollector(registry=REGISTRY)

#: The states of ``kubeinfer_model_state`` (a catalogue model is in exactly one).
MODEL_STATES = ("unloaded", "loading", "loaded", "failed")


def record_finished_request(model_name: str, out: Any) -> None:
    """Observe the per-request histograms for a finished engine request.

    Args:
        model_name: the ``model_name`` label.
        out: the request's last :class:`~kubeinfer_serving.engine.outputs.RequestOutput`
            (``finished`` True): ``num_prompt_tokens`` and ``num_output_tokens`` (tokens), and
            ``timings`` (monotonic seconds of first schedule, first token, last token; None for
            a request that never ran, e.g. aborted while waiting, whose phase times are skipped).
    """
    REQUEST_PROMPT_TOKENS.labels(model_name=model_name).observe(out.num_prompt_tokens)
    REQUEST_GENERATION_TOKENS.labels(model_name=model_name).observe(out.num_output_tokens)
    if _VLLM is not None:
        _VLLM.record_finished(model_name, out)
    timings = getattr(out, "timings", None)
    if timings is None:
        return
    if timings.first_scheduled is not None and timings.first_token is not None:
        REQUEST_PREFILL_TIME.labels(model_name=model_name).observe(max(0.0, timings.first_token - timings.first_scheduled))
    if timings.first_token is not None and timings.last_token is not None:
        REQUEST_DECODE_TIME.labels(model_name=model_name).observe(max(0.0, timings.last_token - timings.first_token))


class ModelStateCollector(Collector):
    """``kubeinfer_model_state{model_name, state}``: 1 for the state each catalogue model is in,
    0 for the others, and ``kubeinfer_ready``: 1 when ``/ready`` answers 200 (every preloaded
    model loaded), else 0; both read from the provider at scrape time (no bookkeeping on
    transitions).

    Args:
        list_models: returns the catalogue's :class:`~kubeinfer_serving.registry.protocol.ModelInfo`
            list (``name``, ``state`` an enum whose value is one of :data:`MODEL_STATES`).
        is_ready: the provider's readiness (what ``/ready`` reports).
    """

    def __init__(self, list_models: Callable[[], Iterable[Any]], is_ready: Callable[[], bool]) -> None:
        self._list_models = list_models
        self._is_ready = is_ready

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "kubeinfer_ready", "1 when every preloaded model is loaded (/ready is 200), else 0.",
            value=1.0 if self._is_ready() else 0.0,
        )
        family = GaugeMetricFamily(
            "kubeinfer_model_state", "1 for the state each model is in (unloaded, loading, loaded, failed).",
            labels=["model_name", "state"],
        )
        for info in self._list_models():
            current = getattr(info.state, "value", info.state)
            for state in MODEL_STATES:
                family.add_metric([info.name, state], 1.0 if current == state else 0.0)
        yield family


#: The HTTP methods that get their own ``method`` label value (RFC 9110's, plus PATCH).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def http_method_label(method: str) -> str:
    """The ``method`` label of a request: the method itself when standard, else ``other``.

    A client picks any token as a method (``M0001``); folding the rest into one value keeps the
    label set bounded.
    """
    return method if method in HTTP_METHODS else "other"


class HTTPMetricsMiddleware:
    """Pure ASGI middleware counting HTTP requests by route template (``/v1/models/{name:path}``,
    never the raw path, so label cardinality stays bounded), method and status code, and timing
    them to the end of the response body (streams included). Unmatched paths count as route
    ``unmatched`` and non-standard methods as method ``other`` (:func:`http_method_label`), so no
    client can grow the label set; ``/metrics`` itself is not counted.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/metrics":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        recorder = StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = http_method_label(scope.get("method", "GET"))
            HTTP_REQUESTS.labels(route=template, method=method, status=str(recorder.status)).inc()
            HTTP_REQUEST_DURATION.labels(route=template, method=method).observe(time.perf_counter() - start)

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
    ["model_name"], registry=REGISTRY,
)
RESULT_CACHE_REQUESTS = Counter(
    "kubeinfer_result_cache_requests", "Cacheable requests looked up in the result cache (outcome: hit or miss).",
    ["model_name", "outcome"], registry=REGISTRY,
)
IGNORED_REQUEST_FIELDS = Counter(
    "kubeinfer_ignored_request_fields", "Request fields this server does not implement, accepted and ignored "
    "(vLLM's policy; :mod:`kubeinfer_serving.api.fields`). The label set is capped: further names count as 'other'.",
    ["field"], registry=REGISTRY,
)
RESULT_CACHE_BYTES = Gauge(
    "kubeinfer_result_cache_bytes", "Bytes of responses held by the result cache.", registry=REGISTRY,
)
_FETCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
MODEL_FETCH_SECONDS = Histogram(
    "kubeinfer_model_fetch_seconds", "Wall time of fetching a remote model (hf://, s3://) into the disk tier.",
    ["model_name"], buckets=_FETCH_BUCKETS, registry=REGISTRY,
)
MODEL_FETCH_BYTES = Counter(
    "kubeinfer_model_fetch_bytes", "Bytes fetched from remote stores into the disk tier.", ["model_name"], registry=REGISTRY
)
DISK_CACHE_HITS = Counter(
    "kubeinfer_disk_cache_hits", "Loads of a remote model that found it in the disk tier.", ["model_name"],
    registry=REGISTRY,
)
DISK_CACHE_MISSES = Counter(
    "kubeinfer_disk_cache_misses", "Loads of a remote model that had to fetch it.", ["model_name"], registry=REGISTRY
)
DISK_CACHE_EVICTIONS = Counter(
    "kubeinfer_disk_cache_evictions", "Snapshots deleted from the disk tier to make room (label: the model "
    "whose fetch needed the room).", ["model_name"], registry=REGISTRY,
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
        model_name: the ``model_name`` label.
    """

    def __init__(self, model_name: str) -> None:
        m = model_name
        self.model_name = model_name
        self._queue = QUEUE_LENGTH.labels(model_name=m)
        self._running = NUM_REQUESTS_RUNNING.labels(model_name=m)
        self._kv = KV_CACHE_USAGE.labels(model_name=m)
        self._ttft = TTFT.labels(model_name=m)
        self._itl = ITL.labels(model_name=m)
        self._e2e = E2E_LATENCY.labels(model_name=m)
        self._qtime = QUEUE_TIME.labels(model_name=m)
        self._prompt = PROMPT_TOKENS.labels(model_name=m)
        self._gen = GENERATION_TOKENS.labels(model_name=m)
        self._preempt = NUM_PREEMPTIONS.labels(model_name=m)
        self._pq = PREFIX_CACHE_QUERIES.labels(model_name=m)
        self._ph = PREFIX_CACHE_HITS.labels(model_name=m)
        self._lora_seen: set[str] = set()  # adapters whose running/waiting gauges were set

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
            REQUESTS_FINISHED.labels(model_name=self.model_name, finish_reason=reason).inc()
        if stats.lora_running is not None:
            self._record_lora(stats)
        if _VLLM is not None:
            _VLLM.record_step(self.model_name, stats)

    def _record_lora(self, stats) -> None:
        m = self.model_name
        if stats.lora_slot_loads:
            LORA_SLOT_LOADS.labels(model_name=m).inc(stats.lora_slot_loads)
        if stats.lora_slot_evictions:
            LORA_SLOT_EVICTIONS.labels(model_name=m).inc(stats.lora_slot_evictions)
        names = set(stats.lora_running) | set(stats.lora_waiting or {})
        for name in names | self._lora_seen:
            LORA_REQUESTS_RUNNING.labels(model_name=m, lora_name=name).set(stats.lora_running.get(name, 0))
            LORA_REQUESTS_WAITING.labels(model_name=m, lora_name=name).set((stats.lora_waiting or {}).get(name, 0))
        self._lora_seen = names
