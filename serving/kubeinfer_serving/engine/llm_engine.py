"""The synchronous engine: queue -> scheduler -> model runner, one iteration per ``step()``.

Not thread-safe: one thread drives it (:class:`~kubeinfer_serving.engine.async_engine.AsyncLLMEngine`
runs it on its own thread). :meth:`LLMEngine.validate` is the exception: it only reads
immutable settings, so the event loop may call it to reject bad requests before queueing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubeinfer_serving.layers.linear import pack_linear_layers, packed_weight_bytes
from kubeinfer_serving.layers.quant import check_quantization, quantize_linear_layers
from kubeinfer_serving.lora.adapter import LoRAAdapter, LoRAShapes
from kubeinfer_serving.lora.manager import LoRAManager
from kubeinfer_serving.lora.slots import LoRASlots
from kubeinfer_serving.models.llama import LlamaForCausalLM

from .block_manager import BlockManager
from .config import CPU_DEFAULT_KV_BYTES, CUDA_DEFAULT_KV_FRACTION, EngineConfig, EngineStats
from .cuda_graphs import decode_graph_sizes
from .detokenizer import IncrementalDetokenizer
from .host_allocator import keep_freed_host_memory
from .kv_sizing import KVSizing, profile_activation_peak, profile_graph_memory
from .model_runner import ModelRunner, kv_bytes_per_block
from .outputs import RequestOutput, RequestTimings
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .stats import StatLogger, StepStats
from .validation import RequestValidator

log = logging.getLogger(__name__)

#: ``RequestOutput.error`` of a request the engine failed; no internal detail reaches the client.
REQUEST_FAILED_MESSAGE = "The server failed while generating for this request; it was aborted"


@dataclass
class _Tracked:
    """Engine-side state of one request beyond its :class:`Sequence`."""

    seq: Sequence
    detok: IncrementalDetokenizer
    sent_tokens: int = 0
    sent_prompt_logprobs: bool = False


def _eos_ids(hf_config: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse weights holding NaN or infinity (a corrupted file that still parses).

    Raises:
        kubeinfer_serving.models.llama.WeightLoadError: naming how many tensors are bad and the first.
    """
    from kubeinfer_serving.models.llama import WeightLoadError

    with torch.no_grad():
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise WeightLoadError(f"{len(bad)} weight tensor(s) hold NaN or infinite values (corrupted weights?), "
                              f"first: {bad[0]}")


def model_max_len(hf_config: Any, config: EngineConfig) -> int:
    """The context length an engine runs with: ``config.max_model_len``, else the model's
    ``max_position_embeddings`` (2048 without one), capped at a sliding window (Mistral)."""
    max_len = int(config.max_model_len or getattr(hf_config, "max_position_embeddings", 2048))
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        max_len = min(max_len, int(window))
    return max_len


def lora_slots_bytes(hf_config: Any, config: EngineConfig, dtype: torch.dtype) -> int:
    """Device bytes of the LoRA slot pool ``config`` asks for (0 when ``max_loras`` is 0)."""
    if not config.max_loras:
        return 0
    return LoRASlots.bytes_for(LoRAShapes.from_hf_config(hf_config), config.max_loras, config.max_lora_rank, dtype)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights hold: its parameters (shared ones once) plus, on CPU, the
    oneDNN-packed copies of its linear weights (:mod:`kubeinfer_serving.layers.linear`)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + packed_weight_bytes(model)


class LLMEngine:
    """Continuous-batching text generation over one model.

    Build it with :meth:`from_model_dir` (a Hugging Face directory) or :meth:`from_weights`.

    Attributes:
        model_name: the ``model`` metric label.
        tokenizer: the Hugging Face tokenizer, or None (then outputs carry no text).
        max_model_len: context length in tokens (prompt + output).
        device, dtype: where and in what the model and KV pool live.
        num_kv_blocks: KV pool size in blocks.
        weights_bytes, kv_cache_bytes: memory held, bytes.
        kv_sizing: the :class:`~.kv_sizing.KVSizing` when a ``kv_pool_sizer`` sized the pool, else None.
        cuda_graph_bytes: device bytes the decode CUDA graphs hold (0 without graphs).
        stat_loggers: called with a :class:`~kubeinfer_serving.engine.stats.StepStats` after
            every step and queue change (see :meth:`add_stat_logger`).
        last_step_stats: the statistics of the latest step.

    ``cuda_graph_sizes`` (constructor): the decode graph buckets to capture, None for none, or
    ``"auto"`` (:func:`~.cuda_graphs.decode_graph_sizes` of the device and config).
    ``tp`` (constructor): rank 0's :class:`~kubeinfer_serving.distributed.executor.TPExecutor`
    when ``model`` is rank 0's shard of a tensor-parallel model, else None.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        *,
        hf_config: Any,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        model_name: str = "model",
        max_model_len: int,
        num_kv_blocks: int,
        cuda_graph_sizes: list[int] | None | str = "auto",
        tp=None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.vocab_size = int(hf_config.vocab_size)
        self.num_kv_blocks = num_kv_blocks
        self.max_model_len = min(max_model_len, num_kv_blocks * self.config.block_size)
        #: The rules a request must pass on this model (context, vocabulary, priority, queue cap).
        self.validator = RequestValidator(
            model_name=model_name, max_model_len=self.max_model_len,
            vocab_size=min(self.vocab_size, len(tokenizer)) if hasattr(tokenizer, "__len__") else self.vocab_size,
            scheduling_policy=self.config.scheduling_policy,
            max_waiting_requests=self.config.max_waiting_requests, has_tokenizer=tokenizer is not None)
        self.eos_token_ids = frozenset(_eos_ids(hf_config, tokenizer))
        #: LoRA adapters and their device slots (None when ``config.max_loras`` is 0).
        self.lora: LoRAManager | None = None
        if self.config.max_loras:
            self.lora = LoRAManager(LoRASlots(LoRAShapes.from_hf_config(hf_config), self.config.max_loras,
                                              self.config.max_lora_rank, self.dtype, self.device))
        self.block_manager = BlockManager(num_kv_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len, policy=self.config.scheduling_policy,
                                   slot_gate=self.lora)
        graph_sizes = (decode_graph_sizes(self.device, self.config.enforce_eager, self.config.max_num_seqs)
                       if cuda_graph_sizes == "auto" else cuda_graph_sizes)
        #: rank 0's :class:`~kubeinfer_serving.distributed.executor.TPExecutor` (None: one rank).
        self.tp = tp
        self.runner = ModelRunner(model, num_kv_blocks, self.config.block_size, self.device,
                                  cuda_graph_sizes=graph_sizes, max_model_len=self.max_model_len, lora=self.lora,
                                  tp=tp)
        #: device bytes the decode CUDA graphs hold (pool + static inputs; 0 without graphs).
        self.cuda_graph_bytes = self.runner.graphs.memory_bytes() if self.runner.graphs is not None else 0
        #: device bytes of the LoRA slot pool (0 with LoRA off), counted in ``weights_bytes``.
        self.lora_slots_bytes = self.lora.slots.nbytes if self.lora is not None else 0
        self.weights_bytes = weight_bytes(model) + self.lora_slots_bytes
        self.kv_cache_bytes = self.runner.kv_cache_bytes
        #: how the pool was sized when a ``kv_pool_sizer`` decided it (set by :meth:`from_weights`), else None.
        self.kv_sizing: KVSizing | None = None
        self._requests: dict[str, _Tracked] = {}
        self.num_steps = 0
        self.stat_loggers: list[StatLogger] = []
        self._lora_reported = (0, 0)  # LoRA slot loads and evictions already reported in StepStats
        self.last_step_stats = StepStats()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weights(
        cls,
        hf_config: Any,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        model_name: str = "model",
        tp=None,
    ) -> LLMEngine:
        """Build the model from a Hugging Face config and (name, tensor) pairs, size the KV pool.

        ``tp``: a launched :class:`~kubeinfer_serving.distributed.executor.TPExecutor`; then
        ``weights`` are rank 0's parts, the model is rank 0's shard, the pool sizes count every rank
        (each rank holds the same number of blocks of its own KV heads) and the workers get the pool
        size and the decode graph buckets once they are decided; every rank then captures its
        graphs together (see :func:`kubeinfer_serving.distributed.launch.load_tp_engine`). If any
        rank's capture fails, every step runs eagerly. The activation peak and the graphs' memory
        are not profiled before the pool is sized (a profiling forward of one rank would wait for
        workers that do not follow it).

        KV pool size: ``config.num_kv_blocks``, else what ``config.kv_pool_sizer`` decides from
        the weights and the activation peak of a profiling step (:mod:`.kv_sizing`; the peak is
        measured on CUDA only) and the measured memory of the decode CUDA graphs plus their null
        block (:func:`~.kv_sizing.profile_graph_memory`; a failed capture there leaves the engine
        eager), else ``config.kv_cache_memory_bytes`` (pool + null block) divided by the block size
        in bytes, else the defaults described in :class:`EngineConfig`. When the
        pool holds fewer tokens than ``max_model_len``, ``max_model_len`` shrinks to fit, so
        any accepted request can always run (alone if need be).

        Raises:
            kubeinfer_serving.models.llama.WeightLoadError: the weights do not fit the config.
            ValueError: a bad dtype or device name.
            kubeinfer_serving.layers.quant.QuantizationError: ``config.quantization`` cannot run on
                the device (fp8 off CUDA); checked before the weights load.
            kubeinfer_serving.engine.kv_sizing.KVPoolSizeError: from ``config.kv_pool_sizer``.
        """
        config = config or EngineConfig()
        device = config.resolve_device()
        dtype = config.resolve_dtype(device)
        check_quantization(config.quantization, device)
        if device.type == "cpu":
            keep_freed_host_memory()  # CPU activations: no page faults on every operator's output
        max_len = model_max_len(hf_config, config)
        model = LlamaForCausalLM(hf_config, max_positions=max_len, dtype=dtype, device=device,
                                 tp=tp.group if tp is not None else None)
        model.load_weights(weights)
        model.eval()
        check_finite_weights(model)
        quantize_linear_layers(model, config.quantization)  # int8 / fp8 projections (none: no-op)
        pack_linear_layers(model)  # CPU float32: oneDNN-packed projections (no-op elsewhere and when quantized)
        ranks = tp.size if tp is not None else 1
        # KV bytes of one block over all ranks (each rank holds its own KV heads of every block).
        per_block = ranks * kv_bytes_per_block(model.num_layers, config.block_size, model.num_kv_heads,
                                               model.head_dim, dtype)
        graph_sizes = decode_graph_sizes(device, config.enforce_eager, config.max_num_seqs)
        sizing = None
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            full = -(-max_len // config.block_size) * config.max_num_seqs
            if config.kv_pool_sizer is not None:
                # A profiling forward of a tensor-parallel shard would wait for workers that do not
                # follow it: not measured there.
                activation = None if tp is not None else profile_activation_peak(
                    model, max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
                    max_model_len=max_len, block_size=config.block_size, device=device)
                graph_bytes = profile_graph_memory(model, sizes=graph_sizes, max_model_len=max_len,
                                                   block_size=config.block_size,
                                                   device=device) if graph_sizes and tp is None else None
                if graph_bytes is None and tp is None:
                    graph_sizes = None  # the capture failed (warned): serve eagerly, with no null block
                weights = ranks * weight_bytes(model) + lora_slots_bytes(hf_config, config, dtype)
                sizing = config.kv_pool_sizer(weights, activation, per_block, full, graph_bytes,
                                              1 if graph_sizes else 0)
                num_blocks = sizing.num_blocks
            elif config.kv_cache_memory_bytes is not None:
                # The asked bytes hold the pool and the graphs' null block.
                num_blocks = config.kv_cache_memory_bytes // per_block - (1 if graph_sizes else 0)
            elif device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)  # each rank has a device of its own
                num_blocks = min(full, int(free * CUDA_DEFAULT_KV_FRACTION) * ranks // per_block)
            else:
                num_blocks = min(full, CPU_DEFAULT_KV_BYTES // per_block)
            num_blocks = max(1, num_blocks)
        engine = cls(model, hf_config=hf_config, tokenizer=tokenizer, config=config, model_name=model_name,
                     max_model_len=max_len, num_kv_blocks=num_blocks, cuda_graph_sizes=graph_sizes, tp=tp)
        engine.kv_sizing = sizing
        if tp is not None:
            graphs = engine.runner.graphs
            # The workers allocate their pools and capture the same graph buckets as rank 0, then report.
            tp.start(num_blocks, graphs.sizes if graphs is not None else None,
                     graphs.width if graphs is not None else 0, capture=engine.runner.capture_graphs)
            if engine.runner.graphs is not None and not tp.graphs_ok:
                engine.runner.graphs = None  # a rank could not capture: every step runs eagerly
            engine.weights_bytes += sum(w for w, _ in tp.worker_bytes)
            engine.kv_cache_bytes += sum(kv for _, kv in tp.worker_bytes)
            engine.cuda_graph_bytes = (engine.runner.graphs.memory_bytes() + sum(tp.worker_graph_bytes)
                                       if engine.runner.graphs is not None else 0)
        return engine

    @classmethod
    def from_model_dir(cls, path: str | Path, *, model_name: str, config: EngineConfig | None = None) -> LLMEngine:
        """Load config, tokenizer and weights from a Hugging Face directory (safetensors) or a
        ``.gguf`` file (dequantized into the engine's dtype, :mod:`kubeinfer_serving.models.gguf`).

        With ``config.tensor_parallel_size`` > 1 the model is split over that many ranks
        (:func:`kubeinfer_serving.distributed.launch.load_tp_engine`).

        Raises:
            kubeinfer_serving.models.loader.ModelLoadError: missing/corrupt files, a GGUF tensor
                type that cannot be dequantized.
            kubeinfer_serving.distributed.sharding.TensorParallelError: heads that do not divide
                by the tensor parallel size (naming the numbers), too few GPUs, LoRA with it.
            kubeinfer_serving.distributed.executor.WorkerFailedError: a worker failed to start or load.
            kubeinfer_serving.models.loader.UnsupportedModelError: architecture not Llama/Mistral/Qwen2.
            kubeinfer_serving.models.llama.WeightLoadError: tensors do not match the config.
        """
        from kubeinfer_serving.models import gguf, loader

        if config is not None and config.tensor_parallel_size > 1:
            from kubeinfer_serving.distributed.launch import load_tp_engine

            return load_tp_engine(cls, path, model_name=model_name, config=config)
        if gguf.is_gguf(path):
            info = gguf.read_gguf(path)
            chosen = config or EngineConfig()
            dtype = chosen.resolve_dtype(chosen.resolve_device())
            return cls.from_weights(info.hf_config, gguf.iter_gguf_weights(path, dtype=dtype, info=info),
                                    tokenizer=gguf.gguf_tokenizer(path, info), config=config, model_name=model_name)
        hf_config = loader.load_hf_config(path)
        tokenizer = loader.load_tokenizer(path)
        return cls.from_weights(hf_config, loader.iter_safetensors(path), tokenizer=tokenizer,
                                config=config, model_name=model_name)

    # ------------------------------------------------------------------ requests
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject a request that can never run (safe to call from another thread): :attr:`validator`'s rules.

        Raises:
            PromptTooLongError: prompt + max_tokens > max_model_len.
            InvalidRequestError (a ValueError): empty prompt, token ids outside the vocabulary (in
                the prompt or in ``logit_bias``, ``allowed_token_ids``, ``bad_words_token_ids``,
                ``stop_token_ids``), stop strings without a tokenizer, a priority the scheduling
                policy does not allow.
        """
        self.validator.validate(prompt_token_ids, params)

    def add_lora(self, adapter: LoRAAdapter) -> None:
        """Serve ``adapter`` to requests that name it (engine thread only).

        Raises:
            ValueError: LoRA is off (``max_loras`` 0) or the name is taken.
            kubeinfer_serving.lora.adapter.AdapterLoadError: its rank exceeds ``max_lora_rank``.
        """
        if self.lora is None:
            raise ValueError("LoRA is off for this engine (max_loras is 0)")
        self.lora.add(adapter)

    def remove_lora(self, name: str) -> bool:
        """Stop serving adapter ``name`` to new requests (those queued or running finish with it).

        Returns:
            False when no adapter of that name is loaded.
        """
        return self.lora is not None and self.lora.remove(name) is not None

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        lora: str | None = None,
    ) -> None:
        """Queue a request; it joins the running batch at a coming step.

        Args:
            arrival_time: ``time.monotonic()`` seconds when it arrived (default now), for
                TTFT, queue time and end-to-end latency.
            lora: the name of a LoRA adapter added with :meth:`add_lora` to run with, or None
                for the base model.

        Raises:
            PromptTooLongError, ValueError: see :meth:`validate`; ValueError also for a
                request id already in the engine and for an unknown adapter.
            QueueFullError: ``max_waiting_requests`` are waiting already.
        """
        self.validate(prompt_token_ids, params)
        adapter = None
        if lora is not None:
            if self.lora is None or lora not in self.lora.adapters:
                raise ValueError(f"LoRA adapter {lora!r} is not loaded in this engine")
            adapter = self.lora.get(lora)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        self.validator.check_queue(self.num_waiting_beyond_batch())
        seq = Sequence(request_id, list(prompt_token_ids), params,
                       arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        seq.lora = adapter
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq.stop_token_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        if params.guide is not None:
            seq.matcher = params.guide.matcher()
        if params.min_tokens:
            seq.min_tokens_stop_ids = tuple(sorted(set(params.stop_token_ids) | self.eos_token_ids))
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop,
                                       include_stop_str=params.include_stop_str_in_output,
                                       skip_special_tokens=params.skip_special_tokens)
        self._requests[request_id] = _Tracked(seq, detok)
        self.scheduler.add(seq)
        self._emit(StepStats())

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Remove a request now and free its KV blocks.

        Returns:
            its final output (finish_reason "abort", the text still held back), or None when
            the id is unknown or already finished.
        """
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return None
        self.scheduler.finish(tracked.seq, "abort")
        stats = StepStats()
        self._on_finished(tracked.seq, time.monotonic(), stats)
        self._emit(stats)
        return self._output(tracked, finished=True)

    def num_waiting_beyond_batch(self, pending: int = 0) -> int:
        """Requests that would really wait: queued (plus ``pending`` not yet added) minus free batch slots.

        ``max_waiting_requests`` caps this number, so a burst that the running batch has room
        for is admitted, not shed. Reads only lengths: safe from another thread.
        """
        free_slots = max(0, self.config.max_num_seqs - len(self.scheduler.running))
        return max(0, len(self.scheduler.waiting) + pending - free_slots)

    def count_abort_before_admission(self, arrival_time: float) -> None:
        """Count a request whose client left before the engine took it in (finish reason "abort").

        Args:
            arrival_time: its ``time.monotonic()`` arrival, for the end-to-end latency.
        """
        stats = StepStats()
        stats.e2e_latencies.append(max(0.0, time.monotonic() - arrival_time))
        stats.finish_reasons.append("abort")
        self._emit(stats)

    def request_ids(self) -> list[str]:
        """Ids of the requests in the engine (waiting or running)."""
        return list(self._requests)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """Queue, batch and KV pool occupancy now."""
        bm = self.block_manager
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage,
        )

    def add_stat_logger(self, logger: StatLogger) -> None:
        """Call ``logger(StepStats)`` after every step and queue change (on the engine's thread)."""
        self.stat_loggers.append(logger)

    # ------------------------------------------------------------------ the iteration
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report progress.

        Returns:
            one output per request that produced tokens (or finished) in this step; a prefill
            chunk short of the prompt's end produces none. The step's statistics are in
            :attr:`last_step_stats` (and went to the stat loggers).
        """
        return self.step_with_stats()[0]

    def step_with_stats(self) -> tuple[list[RequestOutput], StepStats]:
        """One iteration: schedule -> run -> post-process.

        Returns:
            (outputs as :meth:`step` returns them, this step's :class:`StepStats`).
        """
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        stats = StepStats(schedule_s=time.perf_counter() - t0)
        if plan.is_empty:
            self._emit(stats)
            return [], stats
        self.num_steps += 1
        now = time.monotonic()
        for seq in plan.first_scheduled:
            stats.queue_times.append(max(0.0, (seq.first_scheduled_time or now) - seq.arrival_time))
            stats.prompt_tokens += seq.num_prompt_tokens
        stats.num_preemptions = len(plan.preempted)
        stats.prefix_queries, stats.prefix_hits = plan.prefix_queries, plan.prefix_hits
        stats.num_scheduled_seqs = len(plan.scheduled)
        stats.num_batched_tokens = plan.num_batched_tokens

        t1 = time.perf_counter()
        tokens, failed = self._run_isolating_failures(plan.scheduled)
        t2 = time.perf_counter()
        stats.prepare_s = self.runner.last_prepare_s
        stats.model_s = t2 - t1 - stats.prepare_s

        now = time.monotonic()
        outputs: list[RequestOutput] = []
        if failed:  # fail those before applying the step: their chunk did not run
            keep = [i for i, item in enumerate(plan.scheduled) if item.seq.request_id not in failed]
            for item in plan.scheduled:
                if item.seq.request_id in failed:
                    outputs.append(self._fail(item.seq, now, stats))
            plan.scheduled = [plan.scheduled[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        for upd in self.scheduler.update_from_output(plan, tokens):
            seq = upd.seq
            tracked = self._requests[seq.request_id]
            if seq.params.max_tokens == 0:
                # Scoring the prompt only: the scheduler finished it ("length"); nothing is output.
                seq.output_token_ids.pop()
                del self._requests[seq.request_id]
                self._on_finished(seq, now, stats)
                outputs.append(self._output(tracked, finished=True))
                continue
            stats.generation_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
                stats.ttfts.append(now - seq.arrival_time)
            else:
                stats.itls.append(now - (seq.last_token_time or now))
            seq.last_token_time = now
            tracked.detok.add_tokens([upd.token])
            finished = upd.finish_reason is not None
            grammar_done = False
            if seq.matcher is not None:
                try:
                    seq.matcher.consume_token(upd.token)
                    if seq.matcher.is_error():  # llguidance's limits or a dead end: not a completed grammar
                        reason = (seq.matcher.get_error().strip().splitlines() or ["unknown error"])[0]
                        log.warning("engine %s: request %s: the grammar failed: %s", self.model_name,
                                    seq.request_id, reason)
                        outputs.append(self._fail_after_update(
                            seq, finished, now, stats, f"The output grammar failed while generating: {reason}"))
                        continue
                    grammar_done = seq.matcher.is_stopped()  # complete: nothing may follow
                except Exception:  # noqa: BLE001 - a faulty grammar matcher fails its request alone
                    log.exception("engine %s: request %s failed", self.model_name, seq.request_id)
                    outputs.append(self._fail_after_update(seq, finished, now, stats))
                    continue
            if tracked.detok.stopped or grammar_done:
                # A stop string or a completed grammar ends the request as "stop", even on its last allowed token.
                if finished:
                    seq.finish_reason = "stop"
                else:
                    self.scheduler.finish(seq, "stop")
                    finished = True
            if finished:
                del self._requests[seq.request_id]
                self._on_finished(seq, now, stats)
            outputs.append(self._output(tracked, finished=finished))
        stats.update_s = time.perf_counter() - t2
        self._emit(stats)
        return outputs, stats

    # ------------------------------------------------------------------ helpers
    def _run_isolating_failures(self, scheduled: list) -> tuple[list[int | None], set[str]]:
        """Run the step; when it raises, run each sequence alone to find the one(s) at fault.

        One bad request (e.g. sampling parameters torch cannot represent) must fail only itself:
        the batch is re-run one sequence at a time (the KV written by the failed attempt is
        overwritten, as ``num_computed_tokens`` did not advance), and each sequence that still
        raises on its own is reported as failed.

        Returns:
            (token per scheduled item as :meth:`ModelRunner.run` returns them, request ids that failed).
        """
        from kubeinfer_serving.distributed.executor import WorkerFailedError

        try:
            return self.runner.run(scheduled), set()
        except WorkerFailedError:
            raise  # a tensor-parallel worker is gone: no request is at fault, the model fails
        except Exception:  # noqa: BLE001 - isolated below; the engine keeps stepping
            if len(scheduled) == 1:
                log.exception("engine %s: request %s failed", self.model_name, scheduled[0].seq.request_id)
                return [None], {scheduled[0].seq.request_id}
            log.warning("engine %s: a step of %d sequences failed; re-running them one by one",
                        self.model_name, len(scheduled), exc_info=True)
        tokens: list[int | None] = []
        failed: set[str] = set()
        for item in scheduled:
            try:
                tokens.extend(self.runner.run([item]))
            except WorkerFailedError:
                raise
            except Exception:  # noqa: BLE001 - this request alone is at fault
                log.exception("engine %s: request %s failed", self.model_name, item.seq.request_id)
                tokens.append(None)
                failed.add(item.seq.request_id)
        return tokens, failed

    def _fail(self, seq: Sequence, now: float, stats: StepStats,
              message: str = REQUEST_FAILED_MESSAGE) -> RequestOutput:
        """Abort ``seq`` after the engine failed it: free its blocks, report finish_reason "error"
        with ``message``."""
        tracked = self._requests.pop(seq.request_id)
        self.scheduler.finish(seq, "error")
        self._on_finished(seq, now, stats)
        out = self._output(tracked, finished=True)
        out.error = message
        return out

    def _fail_after_update(self, seq: Sequence, finished: bool, now: float, stats: StepStats,
                           message: str = REQUEST_FAILED_MESSAGE) -> RequestOutput:
        """As :meth:`_fail`, for a sequence the step already advanced (``finished``: the scheduler
        already finished it, e.g. on its last allowed token)."""
        if finished:
            seq.finish_reason = "error"
            tracked = self._requests.pop(seq.request_id)
            self._on_finished(seq, now, stats)
            out = self._output(tracked, finished=True)
            out.error = message
            return out
        return self._fail(seq, now, stats, message)

    def _output(self, tracked: _Tracked, *, finished: bool) -> RequestOutput:
        seq = tracked.seq
        new_ids = seq.output_token_ids[tracked.sent_tokens:]
        tracked.sent_tokens = len(seq.output_token_ids)
        new_logprobs = None
        if seq.params.logprobs is not None:
            new_logprobs = seq.output_logprobs[len(seq.output_token_ids) - len(new_ids):]
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and not tracked.sent_prompt_logprobs:
            tracked.sent_prompt_logprobs = True
            prompt_logprobs = list(seq.prompt_logprobs)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=tracked.detok.take_delta(finished),
            finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            new_logprobs=new_logprobs,
            prompt_logprobs=prompt_logprobs,
            timings=RequestTimings(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time,
                                   seq.last_token_time) if finished else None,
        )

    def _on_finished(self, seq: Sequence, now: float, stats: StepStats) -> None:
        stats.e2e_latencies.append(now - seq.arrival_time)
        stats.finish_reasons.append(seq.finish_reason or "abort")

    def _emit(self, stats: StepStats) -> None:
        stats.num_waiting = len(self.scheduler.waiting)
        stats.num_running = len(self.scheduler.running)
        stats.kv_cache_usage = self.block_manager.usage
        if self.lora is not None:
            lora = self.lora
            stats.lora_running = lora.running_counts()
            waiting: dict[str, int] = {}
            for seq in self.scheduler.waiting:
                if seq.lora is not None:
                    waiting[seq.lora.name] = waiting.get(seq.lora.name, 0) + 1
            stats.lora_waiting = waiting
            stats.lora_slot_loads = lora.num_loads - self._lora_reported[0]
            stats.lora_slot_evictions = lora.num_evictions - self._lora_reported[1]
            self._lora_reported = (lora.num_loads, lora.num_evictions)
        self.last_step_stats = stats
        for logger in self.stat_loggers:
            logger(stats)

    def release(self) -> None:
        """Drop the KV pool and the model's tensors so their memory can be freed."""
        self.runner.release()
        self.model = None
        self.runner.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
