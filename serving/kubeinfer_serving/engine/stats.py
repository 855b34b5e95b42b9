"""What one engine step reports for metrics and benchmarks (the engine itself holds no metric handles)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class StepStats:
    """Statistics of one :meth:`~kubeinfer_serving.engine.llm_engine.LLMEngine.step` (or of a
    queue change: ``add_request`` / ``abort_request`` report the gauges with zero counters).

    Gauges (the state after the step):
        num_waiting: requests queued, not running (preempted ones included).
        num_running: sequences in the running batch.
        kv_cache_usage: fraction of KV blocks referenced, 0..1.

    Counters (this step only):
        num_scheduled_seqs / num_batched_tokens: sequences and tokens computed.
        num_preemptions: sequences preempted while planning.
        prefix_queries / prefix_hits: prompt tokens looked up / found in the prefix cache.
        prompt_tokens: prompt tokens of requests scheduled for the first time.
        generation_tokens: output tokens produced.
        lora_slot_loads / lora_slot_evictions: LoRA adapters written into / displaced from a device slot.

    LoRA gauges (None when the engine has LoRA off):
        lora_running / lora_waiting: adapter name -> its requests running / waiting (vLLM's
        ``lora_requests_info``), only adapters with some.

    Per-request observations (seconds):
        queue_times: arrival to first schedule, of requests scheduled for the first time.
        ttfts: arrival to first token.
        itls: gap since the request's previous token.
        e2e_latencies / finish_reasons: arrival to end and why, of requests that finished.

    Host time of the step (seconds, ``time.perf_counter``):
        schedule_s: planning; prepare_s: building the model inputs; model_s: forward pass and
        sampling until the sampled ids are on the host; update_s: the post-step update
        (scheduler bookkeeping, detokenization, outputs).
    """

    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0
    num_scheduled_seqs: int = 0
    num_batched_tokens: int = 0
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    queue_times: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    e2e_latencies: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    schedule_s: float = 0.0
    prepare_s: float = 0.0
    model_s: float = 0.0
    update_s: float = 0.0
    lora_slot_loads: int = 0
    lora_slot_evictions: int = 0
    lora_running: dict[str, int] | None = None
    lora_waiting: dict[str, int] | None = None


#: A consumer of step statistics (e.g. :class:`kubeinfer_serving.metrics.EngineMetrics`).
StatLogger = Callable[[StepStats], None]
