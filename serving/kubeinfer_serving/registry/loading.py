"""Turning a catalogue entry into a running model: sizing it, loading it, offloading it.

:class:`DefaultModelLoader` is what production uses: generate models become an
:class:`~kubeinfer_serving.engine.async_engine.AsyncLLMEngine`, embed models an
:class:`~kubeinfer_serving.embeddings.Embedder`. The registry only talks to the
:class:`ModelLoader` protocol, so its scheduling logic can be tested with any loader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from kubeinfer_serving import metrics
from kubeinfer_serving.embeddings import Embedder
from kubeinfer_serving.engine.async_engine import AsyncLLMEngine
from kubeinfer_serving.engine.config import TORCH_DTYPES, EngineConfig, KVPoolSizer, pick_device
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.layers.quant import check_quantization, quantized_weight_bytes
from kubeinfer_serving.lora.adapter import LoRAShapes
from kubeinfer_serving.lora.slots import LoRASlots
from kubeinfer_serving.models import gguf
from kubeinfer_serving.models import loader as hf
from kubeinfer_serving.models.builtin import (
    builtin_model_dir,
)
from kubeinfer_serving.registry.adapters import AdapterStatus, load_adapter_into, read_adapter
from kubeinfer_serving.registry.catalogue import (
    BUILTIN_SCHEME,
    AdapterEntry,
    Catalogue,
    ModelEntry,
    read_chat_template,
)
from kubeinfer_serving.registry.disk import DiskTier
from kubeinfer_serving.registry.fetch import make_fetcher
from kubeinfer_serving.registry.memory import resolve_budget
from kubeinfer_serving.registry.protocol import ModelKind
from kubeinfer_serving.registry.warm import HostSnapshot

#: Longest wait for a running engine's loop to take an adapter in or out, seconds.
ENGINE_CALL_TIMEOUT_S = 60.0


def resolve_model_dir(source: str, *, pvc_root: str | Path = "/mnt/models") -> Path:
    """The local path of a catalogue ``source`` (a model directory or a ``.gguf`` file);
    ``builtin://`` models are built/located here.

    Raises:
        ModelLoadError: an unknown builtin name or a source :func:`~kubeinfer_serving.models.loader.resolve_source` refuses.
    """
    if source.startswith(BUILTIN_SCHEME):
        return builtin_model_dir(source[len(BUILTIN_SCHEME):])
    return hf.resolve_source(source, pvc_root=pvc_root)


@dataclass
class LoadPlan:
    """What a load will take, known before it starts (the registry evicts to make room for it).

    Attributes:
        model_dir: the resolved local directory.
        weights_bytes: device bytes of the weights in the load dtype (from the checkpoint's
            headers; once the model has loaded, what it measured, which on CPU float32 includes
            the oneDNN-packed copies of its linear weights).
        kv_cache_bytes: device bytes of the KV pool as planned (0 for embed models). A pool sized
            from what the budget has left plans one block here (the registry evicts idle models
            only as far as weights + activation peak + one block need).
        num_kv_blocks: KV pool size in blocks (generate models), else None.
        activation_bytes: activation peak counted before the load (the last measured one, else 0).
        graph_bytes: decode CUDA graph memory + null block counted before the load (the last
            load's, else 0).
        size_kv: set by the registry just before :meth:`ModelLoader.load`: the
            :data:`~kubeinfer_serving.engine.config.KVPoolSizer` that decides the pool once the
            weights are loaded and the activation peak is measured (None: ``num_kv_blocks``).
        revision: pinned revision of a remote source (hub commit, S3 listing digest), else None.
        disk: for remote sources "hit" (found in the disk tier) or "miss" (fetched); "" for local ones.
        fetch_seconds: wall time of the fetch on a miss, else 0.0.
        release: call once when the load does not go ahead (or when the loaded model closes): lets
            the disk tier evict the snapshot again. Idempotent.
        device: set by the registry of a pod with several devices: the model's first device
            (``cuda:K``; a split model's rank r runs on ``cuda:K+r``); None: the loader's device.
    """

    model_dir: Path
    weights_bytes: int
    kv_cache_bytes: int = 0
    num_kv_blocks: int | None = None
    activation_bytes: int = 0
    graph_bytes: int = 0
    size_kv: KVPoolSizer | None = field(default=None, repr=False)
    revision: str | None = None
    disk: str = ""
    fetch_seconds: float = 0.0
    release: Callable[[], None] = field(default=lambda: None, repr=False)
    device: str | None = None

    @property
    def total_bytes(self) -> int:
        """Weights + activation peak + CUDA graphs + KV pool, bytes: what the registry reserves in its budget."""
        return self.weights_bytes + self.activation_bytes + self.graph_bytes + self.kv_cache_bytes


@dataclass(eq=False)
class LoadedModel:
    """A resident model; satisfies :class:`~kubeinfer_serving.registry.protocol.ServedModel`.

    Attributes:
        name, kind, tokenizer, max_model_len, engine, embedder: as in ``ServedModel``.
        memory_bytes: device bytes held (weights + activation peak + decode CUDA graphs + KV pool
            with its null block).
        close: coroutine function that stops the model and drops its device memory.
        offload: coroutine function returning a :class:`HostSnapshot` of the weights for the
            warm tier (called just before ``close``), or None when the model cannot offload.
        warm: whether this load came from the warm tier.
        adapters: the outcome of reading each catalogue adapter of the model, by name.
    """

    name: str
    kind: ModelKind
    tokenizer: Any
    max_model_len: int
    memory_bytes: int
    close: Callable[[], Awaitable[None]] = field(repr=False)
    engine: Any = None
    embedder: Any = None
    offload: Callable[[], Awaitable[HostSnapshot]] | None = field(default=None, repr=False)
    warm: bool = False
    adapters: dict[str, AdapterStatus] = field(default_factory=dict)


class ModelLoader(Protocol):
    """Sizes and loads catalogue entries for :class:`~kubeinfer_serving.registry.manager.ModelRegistry`."""

    def plan(self, entry: ModelEntry) -> LoadPlan:
        """Resolve the source and compute the bytes the load will take. Blocking (run in a thread).

        Raises:
            ModelLoadError: missing directory/files, unsupported architecture (the model is marked Failed).
        """

    def load(self, entry: ModelEntry, plan: LoadPlan, warm: HostSnapshot | None) -> LoadedModel:
        """Load the model (from ``warm`` when given, else from ``plan.model_dir``). Blocking (run in a thread).

        Raises:
            Exception: any failure marks the model Failed with the exception's message.
        """


@dataclass
class _WarmWeights:
    """A generate model's host copy: Hugging Face-named weights plus config and tokenizer."""

    hf_config: Any
    tokenizer: Any
    weights: dict[str, torch.Tensor]


class DefaultModelLoader:
    """The production loader: engines for generate models, :class:`Embedder` for embed models.

    Args:
        catalogue: for the pod-level engine knobs, KV defaults and ``pvcRoot``.
        device: where models run; default CUDA when available, else CPU.
        budget_bytes: the registry's memory budget (``kvCacheFraction`` is a fraction of it);
            default from the catalogue, as the registry resolves it.
    """

    def __init__(self, catalogue: Catalogue, device: torch.device | str | None = None,
                 budget_bytes: int | None = None) -> None:
        self.catalogue = catalogue
        self.device = pick_device(device)
        self.budget_bytes = budget_bytes if budget_bytes is not None else resolve_budget(
            catalogue.memory_budget_bytes, catalogue.gpu_memory_utilization, self.device)
        self._disk: DiskTier | None = None
        self._plans: dict[str, LoadPlan] = {}  # last plan per model name, for loads from the warm tier
        self._disk_lock = threading.Lock()

    @property
    def disk(self) -> DiskTier:
        """The disk tier of remote models (``diskCacheDir``, ``diskCacheBytes``), created on first use."""
        with self._disk_lock:
            if self._disk is None:
                self._disk = DiskTier(self.catalogue.resolved_disk_cache_dir(), self.catalogue.disk_cache_bytes)
            return self._disk

    def on_disk(self, entry: ModelEntry) -> bool:
        """Whether the entry is a remote source whose snapshot is in the disk tier now (no fetch;
        opens the tier on first use); False for local sources."""
        src = entry.parsed_source
        return src.remote and self.disk.has(src.cache_key())

    def _local_dir(self, entry: ModelEntry | AdapterEntry) -> tuple[Path, dict[str, Any]]:
        """The model (or adapter) directory, fetching a remote source into the disk tier (pinned until released)."""
        src = entry.parsed_source
        if not src.remote:
            return resolve_model_dir(entry.source, pvc_root=self.catalogue.pvc_root), {}
        disk = self.disk
        key = src.cache_key()
        snap = disk.ensure(key, make_fetcher(src, entry.credentials_env_prefix), model=entry.name, pin=True)
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                disk.unpin(key)

        path = snap.path / src.remote_file() if src.remote_file() else snap.path  # a GGUF file, else the directory
        return path, {"revision": snap.revision, "disk": "hit" if snap.hit else "miss",
                      "fetch_seconds": snap.fetch_seconds, "release": release}

    def _dtype(self, entry: ModelEntry) -> torch.dtype:
        if entry.dtype != "auto":
            return TORCH_DTYPES[entry.dtype]
        if entry.kind is ModelKind.EMBED or self.device.type != "cuda":
            return torch.float32
        return torch.bfloat16

    def plan(self, entry: ModelEntry) -> LoadPlan:
        """See :meth:`ModelLoader.plan`. KV pool: ``kvCacheBytes`` of the entry (else the pod's)
        or ``kvCacheFraction`` x budget, capped at what ``maxNumSeqs`` sequences of ``maxModelLen``
        tokens need, rounded down to whole blocks of 16 tokens (at least one block); a pool sized
        from the budget plans its smallest size (see :class:`LoadPlan`) and is decided at load
        time. A remote source is first found in, or fetched into, the disk tier
        (:class:`~.disk.DiskTier`; ``FetchError`` when that fails)."""
        path, remote = self._local_dir(entry)
        try:
            plan = self._plan(entry, path, remote)
        except BaseException:
            remote.get("release", lambda: None)()
            raise
        self._plans[entry.name] = plan
        return plan

    def plan_warm(self, entry: ModelEntry) -> LoadPlan:
        """The plan of a model about to load from the warm tier: its last plan's sizes, without a
        disk-tier lookup or fetch (its snapshot is pinned again if it is still on disk)."""
        last = self._plans.get(entry.name)
        if last is None:
            return self.plan(entry)
        src = entry.parsed_source
        release: Callable[[], None] = lambda: None  # noqa: E731
        if src.remote and self.disk.pin_if_present(src.cache_key()):
            key, done = src.cache_key(), threading.Event()

            def release() -> None:
                if not done.is_set():
                    done.set()
                    self.disk.unpin(key)

        return dataclasses.replace(last, disk="", fetch_seconds=0.0, release=release)

    def _plan(self, entry: ModelEntry, path: Path, remote: dict[str, Any]) -> LoadPlan:
        elem = torch.empty((), dtype=self._dtype(entry)).element_size()
        if gguf.is_gguf(path):
            if entry.kind is ModelKind.EMBED:
                raise hf.UnsupportedModelError(f"{entry.source}: a GGUF file serves generate models only")
            info = gguf.read_gguf(path)
            cfg, numel = info.hf_config, info.numel
        else:
            if not path.is_dir():
                raise hf.ModelLoadError(f"model directory {path} (from {entry.source}) does not exist")
            if entry.kind is ModelKind.EMBED:
                return LoadPlan(path, hf.weights_numel(path) * elem, **remote)
            cfg, numel = hf.load_hf_config(path), hf.weights_numel(path)
        check_quantization(entry.quantization, self.device)
        weights = quantized_weight_bytes(cfg, numel, elem, entry.quantization)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        tp = entry.tensor_parallel_size
        if tp > 1:  # every rank holds its KV heads (replicated when fewer than ranks)
            from kubeinfer_serving.distributed.sharding import tp_shape

            kv_heads = tp_shape(cfg, 0, tp).num_kv_heads * tp
        block_size = self.catalogue.block_size
        per_block = 2 * cfg.num_hidden_layers * block_size * kv_heads * head_dim * elem
        max_len = entry.max_model_len or int(getattr(cfg, "max_position_embeddings", 2048))
        full_blocks = -(-max_len // block_size) * self.catalogue.max_num_seqs
        lora = (entry.adapters or self.catalogue.enable_lora) and entry.tensor_parallel_size == 1
        if lora:  # the LoRA slot pool is allocated with the weights (not with tensor parallelism)
            weights += LoRASlots.bytes_for(LoRAShapes.from_hf_config(cfg), self.catalogue.max_loras,
                                           self.catalogue.max_lora_rank, self._dtype(entry))
        asked, fraction = self.catalogue.kv_request(entry)
        if fraction is not None:
            asked = int(fraction * self.budget_bytes)
        wanted = asked if asked is not None else per_block  # an auto pool takes what is left at load time
        blocks = max(1, min(full_blocks, wanted // per_block))
        last = self._plans.get(entry.name)
        if last is not None:  # measured at its last load: on CPU float32 it includes the packed copies
            weights = max(weights, last.weights_bytes)
        return LoadPlan(path, weights, blocks * per_block, blocks, **remote,
                        activation_bytes=last.activation_bytes if last is not None else 0,
                        graph_bytes=last.graph_bytes if last is not None else 0)

    def load(self, entry: ModelEntry, plan: LoadPlan, warm: HostSnapshot | None) -> LoadedModel:
        """See :meth:`ModelLoader.load`. The model's disk-tier snapshot stays pinned until it closes."""
        try:
            if entry.kind is ModelKind.EMBED:
                loaded = self._load_embedder(entry, plan, warm)
            else:
                loaded = self._load_engine(entry, plan, warm)
        except BaseException:
            plan.release()
            raise
        close = loaded.close

        async def close_and_release() -> None:
            try:
                await close()
            finally:
                plan.release()

        loaded.close = close_and_release
        return loaded

    def add_adapter(self, handle: LoadedModel, adapter: AdapterEntry) -> AdapterStatus:
        """Read ``adapter`` and add it to the running engine of ``handle`` (a loaded generate model);
        records the outcome in ``handle.adapters``. Blocking (run it in a thread); never raises."""
        llm = handle.engine.engine
        lora, status = read_adapter(adapter, llm.hf_config, llm.config.max_lora_rank, self._local_dir)
        if lora is not None:
            try:
                handle.engine.call(lambda engine: engine.add_lora(lora)).result(timeout=ENGINE_CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - e.g. LoRA off for this model, engine stopped
                status = AdapterStatus(adapter.name, error=str(exc) or type(exc).__name__)
        if not status.error and self.device.type == "cpu":
            handle.memory_bytes += status.bytes
        handle.adapters[adapter.name] = status
        return status

    def remove_adapter(self, handle: LoadedModel, name: str) -> None:
        """Stop serving adapter ``name`` of ``handle``'s engine to new requests (running ones finish).
        Blocking (run it in a thread)."""
        status = handle.adapters.pop(name, None)
        handle.engine.call(lambda engine: engine.remove_lora(name)).result(timeout=ENGINE_CALL_TIMEOUT_S)
        if status is not None and not status.error and self.device.type == "cpu":
            handle.memory_bytes -= status.bytes

    def _load_embedder(self, entry: ModelEntry, plan: LoadPlan, warm: HostSnapshot | None) -> LoadedModel:
        emb = Embedder.from_model_dir(
            plan.model_dir, device=plan.device or self.device, dtype=self._dtype(entry), name=entry.name,
            host_model=warm.payload if warm is not None else None,
        )

        async def offload() -> HostSnapshot:
            model = await emb.offload()
            nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            return HostSnapshot(model, nbytes)

        return LoadedModel(entry.name, ModelKind.EMBED, emb.tokenizer, emb.max_model_len, emb.memory_bytes,
                           close=emb.shutdown, embedder=emb, offload=offload, warm=warm is not None)

    def _load_engine(self, entry: ModelEntry, plan: LoadPlan, warm: HostSnapshot | None) -> LoadedModel:
        config = EngineConfig(
            max_num_seqs=self.catalogue.max_num_seqs,
            max_num_batched_tokens=self.catalogue.max_num_batched_tokens,
            max_waiting_requests=self.catalogue.max_waiting_requests,
            scheduling_policy=self.catalogue.scheduling_policy,
            enforce_eager=self.catalogue.enforce_eager_for(entry),
            block_size=self.catalogue.block_size,
            num_kv_blocks=plan.num_kv_blocks if plan.size_kv is None else None,
            kv_pool_sizer=plan.size_kv,
            max_model_len=entry.max_model_len,
            device=plan.device or str(self.device),
            dtype=self._dtype(entry),
            max_loras=(self.catalogue.max_loras if (entry.adapters or self.catalogue.enable_lora)
                       and entry.tensor_parallel_size == 1 else 0),
            max_lora_rank=self.catalogue.max_lora_rank,
            quantization=entry.quantization,
            tensor_parallel_size=entry.tensor_parallel_size,
        )
        if warm is not None:
            w: _WarmWeights = warm.payload
            llm = LLMEngine.from_weights(w.hf_config, w.weights.items(), tokenizer=w.tokenizer, config=config,
                                         model_name=entry.name)
        else:
            llm = LLMEngine.from_model_dir(plan.model_dir, model_name=entry.name, config=config)
        if entry.chat_template is not None and llm.tokenizer is not None:  # --chat-template / chatTemplate
            llm.tokenizer.chat_template = read_chat_template(entry.chat_template)
        llm.add_stat_logger(metrics.EngineMetrics(entry.name))
        adapters = {a.name: load_adapter_into(llm, a, self._local_dir) for a in entry.adapters}
        # On CPU the adapters' host copies share the budget's memory with the model.
        adapter_bytes = sum(a.bytes for a in adapters.values()) if self.device.type == "cpu" else 0
        eng = AsyncLLMEngine(llm)
        activation = (llm.kv_sizing.activation_bytes or 0) if llm.kv_sizing is not None else 0
        last = self._plans.get(entry.name)
        if last is not None:  # the next plan of this model (e.g. from the warm tier) counts what was measured
            last.weights_bytes = llm.weights_bytes
            last.activation_bytes = activation
            null_block = llm.kv_cache_bytes // (llm.num_kv_blocks + 1) if llm.runner.graphs is not None else 0
            last.graph_bytes = llm.cuda_graph_bytes + null_block  # the pool holds num_kv_blocks + the null block
        pin = self.device.type == "cuda"

        async def offload() -> HostSnapshot:
            def copy() -> _WarmWeights:
                weights = {}
                for name, p in llm.model.named_parameters():
                    t = p.detach()
                    if t.device.type != "cpu":
                        t = t.to("cpu").pin_memory() if pin else t.to("cpu")
                    weights[name] = t
                return _WarmWeights(llm.hf_config, llm.tokenizer, weights)

            snap = await asyncio.to_thread(copy)
            return HostSnapshot(snap, sum(t.numel() * t.element_size() for t in snap.weights.values()))

        # A quantized model's parameters cannot be reloaded as checkpoint weights, nor can rank 0's
        # shard of a tensor-parallel one: they do not offload.
        offloads = entry.quantization == "none" and entry.tensor_parallel_size == 1
        return LoadedModel(entry.name, ModelKind.GENERATE, eng.tokenizer, eng.max_model_len,
                           eng.memory_bytes + activation + adapter_bytes, close=eng.shutdown, engine=eng,
                           offload=offload if offloads else None, warm=warm is not None,
                           adapters=adapters)
