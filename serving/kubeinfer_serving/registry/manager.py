"""The multi-model registry: loads on demand, evicts least-recently-used idle models to fit a budget.

Rules (DESIGN.md section 5 "Registry"):

* **Single flight.** The first request for an unloaded model starts its load (an asyncio task
  with a future); every later request for it awaits the same future, bounded by
  ``loadTimeoutSeconds``.
* **Budget.** Each resident model costs its weights, its activation peak and its KV pool
  (bytes, as planned by the loader before loading, as sized once its weights are loaded by
  :meth:`ModelRegistry.size_kv`, and as reported by the engine after). A load first reserves its
  planned bytes; while the reservation does not fit (or the model count would exceed
  ``maxLoadedModels``), the least recently used *idle* model is evicted. Idle = loaded,
  not preloaded, with no request holding it and none waiting for it. Models being evicted
  still count until their memory is released.
* **Devices.** Each device of the pod has its own budget (``budgets``; one device: one budget,
  ``budget_bytes``). A model spans one device, or its tensor parallel size of contiguous ones,
  and charges each its share; :func:`~.placement.place` chooses the devices and the LRU victims,
  evicting only models on the devices the new model needs.
* **Waiting.** When nothing evictable is left, the load waits for a model to become idle, up to
  ``acquireTimeoutSeconds``; then its requests get :class:`ModelUnavailableError` (HTTP 503)
  naming the busy models.
* **Failure.** A load that raises (missing files, corrupt safetensors, unsupported architecture,
  out of memory, a model larger than the whole budget) marks the model Failed with the reason;
  requests for it get 503 with that reason; other models are unaffected. An explicit
  :meth:`ModelRegistry.load` retries a Failed model.
* **Idle TTL.** A loaded model that is not preloaded and has had no request for its
  ``idleTimeoutSeconds`` (the entry's, else the catalogue's; absent or 0: never) is unloaded
  by a background task, checked every few seconds; ``/v1/models`` then says so in ``message``
  and ``kubeinfer_model_idle_unloads`` counts it. Its next request loads it again.
* **Warm tier.** With ``warmCacheBytes > 0`` an evicted model's weights stay in host memory
  (:mod:`.warm`) and its next load skips the disk.
* **LoRA adapters.** A catalogue adapter is a model id of its own: a request for it acquires its
  base model (loading it by the rules above) and runs with the adapter
  (:class:`~.adapters.AdapterBoundEngine`). Adapters are read when their base loads and counted
  in its bytes; one that fails is Failed with its reason while the base and the others serve.
  Device slots among a model's adapters are the engine's (:mod:`kubeinfer_serving.lora.manager`).

Everything runs on one asyncio event loop; state changes between awaits are atomic. Blocking
work (planning, loading) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch

from kubeinfer_serving import metrics
from kubeinfer_serving.engine.config import KVPoolSizer, pick_device
from kubeinfer_serving.engine.kv_sizing import KVSizing, size_kv_pool
from kubeinfer_serving.registry.adapters import AdapterBoundEngine, AdapterStatus
from kubeinfer_serving.registry.catalogue import DEFAULT_KV_CACHE_BYTES, AdapterEntry, Catalogue, ModelEntry
from kubeinfer_serving.registry.loading import DefaultModelLoader, LoadedModel, ModelLoader
from kubeinfer_serving.registry.memory import device_budgets, pod_devices
from kubeinfer_serving.registry.placement import Holder, capacity, per_device_bytes, place
from kubeinfer_serving.registry.protocol import (
    AdapterRequestError,
    ModelInfo,
    ModelKind,
    ModelNotFoundError,
    ModelState,
    ModelTier,
    ModelUnavailableError,
    ModelUsage,
    PodUsage,
)
from kubeinfer_serving.registry.warm import WarmTier

log = logging.getLogger(__name__)

#: ``retry_after`` (seconds) suggested with a 503 for lack of memory or a slow load.
RETRY_AFTER_SECONDS = 5.0


@dataclass
class LoadEvent:
    """One completed load or unload, for measurements and logs.

    Attributes:
        model: model name.
        action: "cold_load" (from disk), "warm_load" (from the warm tier), "evict" (LRU) or "unload" (admin).
        seconds: wall time of the action.
        bytes: device bytes loaded or freed.
        disk: for a cold load of a remote model, "hit" (found in the disk tier) or "miss" (fetched); else "".
        fetch_seconds: wall time of that fetch (a miss), else 0.0; not part of ``seconds``.
    """

    model: str
    action: str
    seconds: float
    bytes: int
    disk: str = ""
    fetch_seconds: float = 0.0


@dataclass(eq=False)
class _Entry:
    spec: ModelEntry
    created: int
    state: ModelState = ModelState.UNLOADED
    message: str = ""
    handle: LoadedModel | None = None
    reserved: int = 0            # bytes counted against the budget (planned while loading, actual when loaded)
    active: int = 0              # requests holding the model
    waiting: int = 0             # requests waiting for it to load
    last_used: float = 0.0       # time.monotonic() of the last acquire/release
    load_future: asyncio.Future | None = field(default=None, repr=False)
    evicting: asyncio.Future | None = field(default=None, repr=False)
    max_model_len: int | None = None
    revision: str | None = None  # pinned revision of a remote source, once fetched or found on disk
    placement: tuple[int, ...] = (0,)  # device indexes it spans (see .placement), set when reserved

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def holds_slot(self) -> bool:
        """Counts towards maxLoadedModels: loaded, loading with a reservation, or being evicted."""
        return self.state is ModelState.LOADED or self.reserved > 0 or self.evicting is not None

    @property
    def idle(self) -> bool:
        return self.active == 0 and self.waiting == 0


@dataclass(eq=False)
class _Adapter:
    spec: AdapterEntry
    base: str
    created: int
    runtime: bool = False        # added by load_adapter (not in the catalogue)


class ModelRegistry:
    """Implements :class:`~kubeinfer_serving.registry.protocol.ModelProvider` over a :class:`Catalogue`.

    Args:
        catalogue: the models and the pod-level limits.
        loader: sizes and loads models; default :class:`DefaultModelLoader` (engines and embedders).
        budget_bytes: override of the byte budget of each device (CPU slots: of the host, split
            between them); default from the catalogue (``memoryBudgetBytes``, else
            ``gpuMemoryUtilization`` x device memory; :func:`~.memory.device_budgets`).
        device: where models run (default CUDA when available, else CPU).
        devices: the pod's devices models are placed on (:func:`~.memory.pod_devices`: default
            every visible GPU, else ``[device]``); several CPU entries make CPU "slots" whose
            per-device accounting works as GPUs' does (placement: :mod:`.placement`).
        show_sources: report each model's catalogue ``source`` in :meth:`list_models`; single-model
            mode turns it off (its source is a local path given on the command line).

    Attributes:
        budget_bytes: bytes of weights + KV pools allowed in the pod at once (sum of ``budgets``).
        devices: the pod's devices; budgets: bytes allowed on each of them.
        warm: the host-memory tier of evicted weights.
        events: completed loads/evictions (:class:`LoadEvent`), oldest first.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        loader: ModelLoader | None = None,
        budget_bytes: int | None = None,
        device: torch.device | str | None = None,
        devices: list[torch.device | str] | None = None,
        show_sources: bool = True,
    ) -> None:
        self.catalogue = catalogue
        self.show_sources = show_sources
        self.device = pick_device(device)
        self.devices = pod_devices(self.device, devices)
        self.budgets = device_budgets(budget_bytes if budget_bytes is not None else catalogue.memory_budget_bytes,
                                      catalogue.gpu_memory_utilization, self.devices)
        self.budget_bytes = sum(self.budgets)
        self.loader: ModelLoader = loader or DefaultModelLoader(catalogue, self.device, self.budgets[0])
        self.max_loaded_models = catalogue.max_loaded_models
        self.warm = WarmTier(catalogue.warm_cache_bytes)
        self.events: list[LoadEvent] = []
        now = int(time.time())
        self._entries = {m.name: _Entry(m, now, max_model_len=m.max_model_len) for m in catalogue.models}
        self._adapters = {a.name: _Adapter(a, m.name, now) for m in catalogue.models for a in m.adapters}
        self._changed: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._reaper: asyncio.Task | None = None
        #: called as ``on_preload_failed(name, reason)`` by :meth:`start` for each preloaded model
        #: that failed to load (single-model mode exits with the reason); None: only logged.
        self.on_preload_failed: Callable[[str, str], None] | None = None

    # ------------------------------------------------------------------ ModelProvider
    def list_models(self) -> list[ModelInfo]:
        """Every catalogue entry in catalogue order, each model followed by its adapters; ``bytes``
        is the device bytes held while loaded (an adapter's: its weights' host bytes)."""
        out = []
        for e in self._entries.values():
            out.append(self._info(e))
            out.extend(self._adapter_info(a) for a in self._adapters.values() if a.base == e.name)
        return out

    @asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[LoadedModel]:
        """Hold model ``name`` as :meth:`_acquire_model` does; for an adapter's name, hold its base
        model and yield it bound to the adapter (its ``engine`` generates with the adapter).

        Raises:
            ModelUnavailableError: also when the adapter failed to load (the message says why).
        """
        adapter = self._adapters.get(name)
        if adapter is None:
            async with self._acquire_model(name) as handle:
                yield handle
            return
        async with self._acquire_model(adapter.base) as handle:
            status = handle.adapters.get(name)
            if status is None or status.error:
                reason = status.error if status is not None else "not read with its base model"
                raise ModelUnavailableError(f"adapter {name!r} failed to load: {reason}")
            yield dataclasses.replace(handle, name=name, engine=AdapterBoundEngine(handle.engine, name))

    async def load_adapter(self, name: str, source: str, base: str | None = None) -> ModelInfo:
        """Add LoRA adapter ``name`` from ``source`` at run time (vLLM's ``/v1/load_lora_adapter``).

        Its base model is loaded if it is not; the adapter is read into it and from then on is
        part of the model: when the model is evicted and loaded again the adapter is read again.

        Args:
            base: the base model's name; None when the catalogue has one generate model.

        Raises:
            AdapterRequestError: the name is taken, the source or base is invalid, or the adapter
                cannot be used with the base (the reason: rank, shapes, files, LoRA off).
            ModelNotFoundError: ``base`` is not a model of the catalogue.
            ModelUnavailableError: the base model cannot be loaded now.
        """
        if name in self._entries or name in self._adapters:
            raise AdapterRequestError(f"The lora adapter '{name}' has already been loaded.")
        generate = [e.name for e in self._entries.values() if e.spec.kind is ModelKind.GENERATE]
        if base is None:
            if len(generate) != 1:
                raise AdapterRequestError(f"base_model_name is required: this server has {len(generate)} "
                                          f"generate models ({', '.join(generate)})")
            base = generate[0]
        if self._get(base).spec.kind is not ModelKind.GENERATE:
            raise AdapterRequestError(f"{base!r} is not a generate model; only those take LoRA adapters")
        try:
            spec = AdapterEntry(name=name, source=source)
        except ValueError as exc:
            raise AdapterRequestError(f"invalid adapter: {exc}") from None
        adapter = _Adapter(spec, base, int(time.time()), runtime=True)
        self._adapters[name] = adapter
        try:
            async with self._acquire_model(base) as handle:
                status = handle.adapters.get(name)
                if status is None:  # the base was loaded before: add it to the running engine
                    status = await asyncio.to_thread(self.loader.add_adapter, handle, spec)
                    self._entries[base].reserved = handle.memory_bytes
                if status.error:
                    handle.adapters.pop(name, None)
                    raise AdapterRequestError(f"adapter {name!r} failed to load: {status.error}")
        except BaseException:
            self._adapters.pop(name, None)
            raise
        return self._adapter_info(adapter)

    async def unload_adapter(self, name: str) -> None:
        """Remove an adapter added by :meth:`load_adapter` (vLLM's ``/v1/unload_lora_adapter``);
        requests already queued or running with it finish.

        Raises:
            ModelNotFoundError: no adapter of that name.
            AdapterRequestError: it is a catalogue adapter (those follow the catalogue).
        """
        adapter = self._adapters.get(name)
        if adapter is None:
            raise ModelNotFoundError(f"The lora adapter '{name}' cannot be found.")
        if not adapter.runtime:
            raise AdapterRequestError(f"adapter {name!r} is in the catalogue; it is removed by editing the "
                                      "catalogue (the InferenceService), not at run time")
        del self._adapters[name]
        base = self._entries[adapter.base]
        if base.handle is not None and name in base.handle.adapters:
            await asyncio.to_thread(self.loader.remove_adapter, base.handle, name)
            base.reserved = base.handle.memory_bytes

    def _spec_with_adapters(self, entry: _Entry) -> ModelEntry:
        """``entry``'s catalogue spec plus the adapters added to it at run time (read when it loads)."""
        extra = [a.spec for a in self._adapters.values() if a.runtime and a.base == entry.name]
        return entry.spec.model_copy(update={"adapters": [*entry.spec.adapters, *extra]}) if extra else entry.spec

    def _adapter_status(self, a: _Adapter) -> AdapterStatus | None:
        """The outcome of reading adapter ``a`` into its loaded base, or None while the base is not loaded."""
        base = self._entries[a.base]
        if base.handle is None or base.state is not ModelState.LOADED:
            return None
        return base.handle.adapters.get(a.spec.name)

    def _adapter_tier(self, a: _Adapter, status: AdapterStatus | None) -> ModelTier:
        """DEVICE while it serves with its loaded base, else where its files are (DISK or ABSENT)."""
        if status is not None and not status.error:
            return ModelTier.DEVICE
        if not a.spec.parsed_source.remote:
            return ModelTier.DISK
        on_disk = getattr(self.loader, "on_disk", None)
        return ModelTier.DISK if on_disk is not None and on_disk(a.spec) else ModelTier.ABSENT

    def _adapter_info(self, a: _Adapter) -> ModelInfo:
        base = self._entries[a.base]
        status = self._adapter_status(a)
        if status is None:
            state, message, nbytes = ModelState.UNLOADED, "", 0
        elif status.error:
            state, message, nbytes = ModelState.FAILED, status.error, 0
        else:
            state, message, nbytes = ModelState.LOADED, "", status.bytes
        return ModelInfo(
            name=a.spec.name, kind=ModelKind.GENERATE, state=state, bytes=nbytes, message=message,
            preload=base.spec.preload, max_model_len=base.max_model_len, created=a.created,
            idle_timeout_seconds=self.idle_timeout(base), source=a.spec.source if self.show_sources else "",
            revision=status.revision if status is not None else None, parent=a.base,
            tier=self._adapter_tier(a, status),
        )

    @asynccontextmanager
    async def _acquire_model(self, name: str) -> AsyncIterator[LoadedModel]:
        """Load ``name`` if needed and hold it (never evicted) until the context exits.

        Yields:
            the :class:`LoadedModel` (``engine`` for generate models, ``embedder`` for embed models).

        Raises:
            ModelNotFoundError: not in the catalogue.
            ModelUnavailableError: the model is Failed (message has the reason), memory could not be
                freed within ``acquireTimeoutSeconds`` (message names the busy models), the load took
                longer than ``loadTimeoutSeconds``, or the registry is shutting down.
        """
        entry = self._get(name)
        entry.waiting += 1
        try:
            handle = await self._ensure_loaded(entry, retry_failed=False)
            entry.active += 1  # no await since the check above: it cannot have been evicted
        finally:
            entry.waiting -= 1
        entry.last_used = time.monotonic()
        try:
            yield handle
        finally:
            entry.active -= 1
            entry.last_used = time.monotonic()
            self._notify()

    def resident_models(self) -> list[str]:
        """Names of the loaded models (tier DEVICE), in catalogue order, each followed by its
        adapters that serve with it (so a router prefers the pods holding an adapter)."""
        out = []
        for e in self._entries.values():
            if e.state is ModelState.LOADED and e.handle is not None:
                out.append(e.name)
                out.extend(n for n, st in e.handle.adapters.items() if not st.error and n in self._adapters)
        return out

    def usage(self) -> PodUsage:
        """The pod's load and memory now (see :class:`~.protocol.PodUsage`): per model the engine's
        :meth:`~kubeinfer_serving.engine.async_engine.AsyncLLMEngine.stats` (queue lengths only,
        no lock) plus the requests waiting for its load."""
        models = []
        for e in self._entries.values():
            use = ModelUsage(e.name, queue_length=e.waiting)
            engine = e.handle.engine if e.handle is not None else None
            if engine is not None:
                stats = engine.stats()
                use.queue_length += stats.num_waiting
                use.running, use.kv_cache_usage = stats.num_running, stats.kv_cache_usage
            elif e.handle is not None:
                use.running = e.active
            models.append(use)
            models.extend(self._adapter_usage(e, use))
        evictable = sum(e.reserved for e in self._entries.values() if e.state is ModelState.LOADED
                        and e.idle and not e.spec.preload and e.evicting is None)
        return PodUsage(budget_bytes=self.budget_bytes, used_bytes=self.used_bytes(), evictable_bytes=evictable,
                        warm_tier=self.warm.capacity_bytes > 0, models=models,
                        max_loaded_models=self.max_loaded_models,
                        loaded_models=sum(1 for e in self._entries.values() if e.holds_slot))

    def _adapter_usage(self, base: _Entry, base_use: ModelUsage) -> list[ModelUsage]:
        """Usage of ``base``'s adapters: their running and queued requests in its engine (from the
        engine's latest step statistics) plus the base's requests waiting for its load."""
        adapters = [a for a in self._adapters.values() if a.base == base.name]
        if not adapters:
            return []
        engine = base.handle.engine if base.handle is not None else None
        llm = getattr(engine, "engine", None)
        stats = getattr(llm, "last_step_stats", None)
        running = (stats.lora_running if stats is not None else None) or {}
        waiting = (stats.lora_waiting if stats is not None else None) or {}
        return [ModelUsage(a.spec.name, queue_length=base.waiting + waiting.get(a.spec.name, 0),
                           running=running.get(a.spec.name, 0), kv_cache_usage=base_use.kv_cache_usage)
                for a in adapters]

    def tier(self, name: str) -> ModelTier:
        """Where model ``name``'s weights are now: DEVICE (loaded), HOST (warm tier), DISK (a remote
        source in the disk tier) or ABSENT (a load reads it from its source: fetches a remote one,
        reads a local path, PVC or built-in model, which every pod reaches at the same cost).

        Raises:
            ModelNotFoundError: unknown name.
        """
        if name in self._adapters:
            a = self._adapters[name]
            return self._adapter_tier(a, self._adapter_status(a))
        e = self._get(name)
        if e.state is ModelState.LOADED:
            return ModelTier.DEVICE
        if name in self.warm:
            return ModelTier.HOST
        on_disk = getattr(self.loader, "on_disk", None)
        return ModelTier.DISK if on_disk is not None and on_disk(e.spec) else ModelTier.ABSENT

    def is_ready(self) -> bool:
        """True once every preloaded model has settled, loaded or Failed with its reason, and at
        least one of them loaded (or none is preloaded): a failed preload does not hold back a pod
        that serves the others, whose requests for the failed model get 503 with the reason.
        Remote preloaded models are fetched into the disk tier before they count as loaded."""
        preload = [e for e in self._entries.values() if e.spec.preload]
        settled = all(e.state in (ModelState.LOADED, ModelState.FAILED) for e in preload)
        return settled and (not preload or any(e.state is ModelState.LOADED for e in preload))

    def dead_models(self) -> list[str]:
        """Names of loaded generative models whose engine loop crashed."""
        return [e.name for e in self._entries.values()
                if e.handle is not None and getattr(e.handle.engine, "is_dead", False)]

    def idle_timeout(self, entry: _Entry) -> float | None:
        """Seconds of idleness after which ``entry`` is unloaded, or None (never: preloaded or no TTL)."""
        if entry.spec.preload:
            return None
        ttl = entry.spec.idle_timeout_seconds
        if ttl is None:
            ttl = self.catalogue.idle_timeout_seconds
        return ttl or None

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Start unloading every loaded model idle for longer than its TTL; returns their names."""
        now = time.monotonic() if now is None else now
        unloaded = []
        for e in self._entries.values():
            ttl = self.idle_timeout(e)
            if (ttl is not None and e.state is ModelState.LOADED and e.idle and e.evicting is None
                    and now - e.last_used >= ttl):
                self._start_unload(e, action="idle_unload")
                e.message = f"unloaded after {ttl:g} s without requests"
                metrics.MODEL_IDLE_UNLOADS.labels(model_name=e.name).inc()
                unloaded.append(e.name)
        return unloaded

    async def _reap_idle(self, interval: float) -> None:
        while not self._closing:
            await asyncio.sleep(interval)
            self.unload_idle()

    async def start(self) -> None:
        """Load the preloaded models (concurrently); a failure marks that model Failed and does not raise.

        Also starts the idle-TTL task when some model has a TTL.
        """
        ttls = [t for t in (self.idle_timeout(e) for e in self._entries.values()) if t]
        if ttls and self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle(min(5.0, min(ttls) / 4)))
        preload = [e for e in self._entries.values() if e.spec.preload]
        results = await asyncio.gather(
            *(self._ensure_loaded(e, retry_failed=True) for e in preload), return_exceptions=True
        )
        for e, r in zip(preload, results, strict=True):
            if isinstance(r, BaseException):
                log.error("preloading %s failed: %s", e.name, r)
                if self.on_preload_failed is not None:
                    self.on_preload_failed(e.name, e.message or str(r))

    async def shutdown(self) -> None:
        """Stop accepting loads, wait for loads in flight, close every model and drop the warm tier."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        self._notify()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for e in self._entries.values():
            if e.handle is not None:
                handle, e.handle = e.handle, None
                try:
                    await handle.close()
                except Exception:  # noqa: BLE001 - shutting down regardless
                    log.exception("closing %s failed", e.name)
                del handle
            e.state, e.reserved = ModelState.UNLOADED, 0
            metrics.MODEL_LOADED_BYTES.labels(model_name=e.name).set(0)
        self.warm.clear()
        self._free_device_memory()

    async def load(self, name: str) -> ModelInfo:
        """Load ``name`` now (admin API), retrying it if it had Failed; same errors as :meth:`acquire`.
        For an adapter's name its base model is loaded (the adapter with it)."""
        if name in self._adapters:
            await self.load(self._adapters[name].base)
            return self._adapter_info(self._adapters[name])
        entry = self._get(name)
        entry.waiting += 1
        try:
            await self._ensure_loaded(entry, retry_failed=True)
        finally:
            entry.waiting -= 1
        entry.last_used = time.monotonic()
        self._notify()
        return self._info(entry)

    async def unload(self, name: str) -> ModelInfo:
        """Unload an idle model (admin API); a Failed model is reset to unloaded (so it can be retried).

        Raises:
            ModelNotFoundError: unknown name.
            ModelUnavailableError: the model is preloaded, loading, or busy (requests hold or await it),
                or the name is a catalogue adapter's (it stays while its base model is loaded).
        """
        if name in self._adapters:
            raise ModelUnavailableError(f"{name!r} is a LoRA adapter of {self._adapters[name].base!r}; "
                                        "catalogue adapters are unloaded with their base model")
        entry = self._get(name)
        if entry.spec.preload:
            raise ModelUnavailableError(f"model {name!r} is preloaded and is never unloaded")
        if not entry.idle:
            raise ModelUnavailableError(
                f"model {name!r} is busy ({entry.active} running, {entry.waiting} waiting requests)",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if entry.state is ModelState.LOADING:
            raise ModelUnavailableError(f"model {name!r} is loading", retry_after=RETRY_AFTER_SECONDS)
        if entry.state is ModelState.FAILED:
            entry.state, entry.message = ModelState.UNLOADED, ""
        elif entry.state is ModelState.LOADED:
            self._start_unload(entry, action="unload")
        if entry.evicting is not None:
            await asyncio.shield(entry.evicting)
        return self._info(entry)

    # ------------------------------------------------------------------ introspection
    def used_bytes(self) -> int:
        """Bytes of the budget reserved now (loaded, loading and still-evicting models)."""
        return sum(e.reserved for e in self._entries.values())

    def placement(self, name: str) -> tuple[int, ...]:
        """Indexes into :attr:`devices` of the devices model ``name`` holds memory on (() when none)."""
        e = self._get(name)
        return e.placement if e.reserved > 0 else ()

    def device_used_bytes(self) -> list[int]:
        """Bytes reserved on each device of :attr:`devices` now (loaded, loading, being evicted)."""
        used = [0] * len(self.budgets)
        for h in self._holders(list(self._entries.values())):
            for d in h.devices:
                used[d] += h.per_device
        return used

    def in_use(self, name: str) -> tuple[int, int]:
        """(requests holding, requests waiting for) model ``name``."""
        e = self._get(name)
        return e.active, e.waiting

    # ------------------------------------------------------------------ internals
    def _get(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            only = f"; this server serves '{next(iter(self._entries))}'" if len(self._entries) == 1 else ""
            raise ModelNotFoundError(f"The model '{name}' does not exist{only}")
        return entry

    def _info(self, e: _Entry) -> ModelInfo:
        state, message = e.state, e.message
        dead = getattr(e.handle.engine, "dead_reason", None) if e.handle is not None else None
        if dead:  # its engine crashed (e.g. a tensor-parallel worker died): Failed, with the reason
            state, message = ModelState.FAILED, dead
        return ModelInfo(
            name=e.name, kind=e.spec.kind, state=state,
            bytes=e.reserved if e.state is ModelState.LOADED else 0,
            message=message, preload=e.spec.preload, max_model_len=e.max_model_len, created=e.created,
            idle_timeout_seconds=self.idle_timeout(e),
            source=e.spec.source if self.show_sources else "", revision=e.revision, tier=self.tier(e.name),
        )

    def _notify(self) -> None:
        """Wake everything waiting for memory or a state change."""
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _ensure_loaded(self, entry: _Entry, *, retry_failed: bool) -> LoadedModel:
        """Return the loaded model, starting its load if nobody has; waits at most ``loadTimeoutSeconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.catalogue.load_timeout_seconds
        while True:
            if self._closing:
                raise ModelUnavailableError("the server is shutting down")
            if entry.state is ModelState.LOADED:
                assert entry.handle is not None
                return entry.handle
            if entry.state is ModelState.FAILED:
                if not retry_failed:
                    raise ModelUnavailableError(f"model {entry.name!r} failed to load: {entry.message}")
                entry.state, entry.message = ModelState.UNLOADED, ""
            retry_failed = False
            if entry.state is ModelState.UNLOADED:
                self._begin_load(entry)
            assert entry.load_future is not None
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(asyncio.shield(entry.load_future), max(remaining, 0))
            except asyncio.TimeoutError:
                raise ModelUnavailableError(
                    f"model {entry.name!r} is still loading after {self.catalogue.load_timeout_seconds:g} s",
                    retry_after=RETRY_AFTER_SECONDS,
                ) from None

    def _begin_load(self, entry: _Entry) -> None:
        """Mark ``entry`` Loading and start its single load task (synchronously: no await in between)."""
        entry.state = ModelState.LOADING
        entry.message = ""
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even with no waiter
        entry.load_future = fut
        self._spawn(self._load(entry, fut))

    async def _load(self, entry: _Entry, fut: asyncio.Future) -> None:
        name = entry.name
        try:
            if entry.evicting is not None:  # a previous unload of this model is still releasing memory
                await asyncio.shield(entry.evicting)
            # A model whose weights sit in the warm tier is not looked up in (or fetched into) the disk tier.
            plan_warm = getattr(self.loader, "plan_warm", None)
            planner = plan_warm if plan_warm is not None and name in self.warm else self.loader.plan
            spec = self._spec_with_adapters(entry)
            plan = await asyncio.to_thread(planner, spec)
            entry.revision = getattr(plan, "revision", None)
            release = getattr(plan, "release", lambda: None)
            ranks = self._ranks(entry)
            if plan.total_bytes > capacity(self.budgets, ranks):
                release()
                raise MemoryError(
                    f"needs {plan.total_bytes} bytes (weights {plan.weights_bytes} + KV pool "
                    f"{plan.kv_cache_bytes}), more than the whole memory budget of "
                    f"{capacity(self.budgets, ranks)} bytes" + self._span_text(ranks)
                )
            warm = self.warm.pop(name)  # taken before evicting, so evictions cannot push it out of the tier
            try:
                await self._reserve(entry, plan.total_bytes)
            except BaseException:
                release()
                if warm is not None:
                    self.warm.put(name, warm)
                raise
            if entry.spec.kind is ModelKind.GENERATE:
                plan.size_kv = self._kv_sizer(entry, asyncio.get_running_loop())
            plan.device = str(self.devices[entry.placement[0]]) if len(self.devices) > 1 else None
            t0 = time.perf_counter()
            handle = await asyncio.to_thread(self.loader.load, spec, plan, warm)
            seconds = time.perf_counter() - t0
            del warm
        except ModelUnavailableError as exc:  # no memory in time, or shutting down: not the model's fault
            entry.state, entry.reserved = ModelState.UNLOADED, 0
            fut.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - any load failure marks only this model Failed
            entry.state, entry.reserved = ModelState.FAILED, 0
            entry.message = str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
            metrics.MODEL_LOAD_FAILURES.labels(model_name=name).inc()
            log.error("loading %s failed: %s", name, entry.message)
            self._free_device_memory()
            fut.set_exception(ModelUnavailableError(f"model {name!r} failed to load: {entry.message}"))
        else:
            entry.handle, entry.reserved = handle, handle.memory_bytes
            entry.max_model_len = handle.max_model_len
            entry.state, entry.last_used = ModelState.LOADED, time.monotonic()
            metrics.MODEL_LOADS.labels(model_name=name).inc()
            metrics.MODEL_LOAD_SECONDS.labels(model_name=name).observe(seconds)
            metrics.MODEL_LOADED_BYTES.labels(model_name=name).set(handle.memory_bytes)
            self.events.append(LoadEvent(name, "warm_load" if handle.warm else "cold_load", seconds,
                                         handle.memory_bytes, disk=getattr(plan, "disk", ""),
                                         fetch_seconds=getattr(plan, "fetch_seconds", 0.0)))
            log.info("loaded %s (%s, %d bytes) in %.3f s", name, "warm" if handle.warm else "cold",
                     handle.memory_bytes, seconds)
            fut.set_result(None)
        finally:
            self._notify()

    def _kv_sizer(self, entry: _Entry, loop: asyncio.AbstractEventLoop) -> KVPoolSizer:
        """The KV pool sizer of ``entry``'s load: called from the loading thread, it runs
        :meth:`size_kv` on the event loop, so it sees (and updates) every reservation at once."""

        def size(weights_bytes: int, activation_bytes: int | None, block_bytes: int, max_blocks: int,
                 graph_bytes: int | None = None, extra_blocks: int = 0) -> KVSizing:
            async def on_loop() -> KVSizing:
                return self.size_kv(entry.name, weights_bytes, activation_bytes, block_bytes, max_blocks,
                                    graph_bytes=graph_bytes, extra_blocks=extra_blocks)

            return asyncio.run_coroutine_threadsafe(on_loop(), loop).result()

        return size

    def size_kv(self, name: str, weights_bytes: int, activation_bytes: int | None, block_bytes: int,
                max_blocks: int, *, graph_bytes: int | None = None, extra_blocks: int = 0) -> KVSizing:
        """Size the KV pool of loading model ``name`` against the budget and reserve what it holds.

        :func:`~kubeinfer_serving.engine.kv_sizing.size_kv_pool` with the other models'
        reservations (loaded, loading, being evicted) as ``others_bytes``; the entry's (else the
        pod's) ``kvCacheBytes`` / ``kvCacheFraction``; for an auto pool ``share`` = 1 + the
        auto-sized generate models that hold no memory yet (at most the free ``maxLoadedModels``
        slots) and, on CPU, :data:`~.catalogue.DEFAULT_KV_CACHE_BYTES` as the fallback;
        ``graph_bytes`` / ``extra_blocks``: the model's measured decode CUDA graph memory and its
        null block (:func:`~kubeinfer_serving.engine.kv_sizing.size_kv_pool`). On success the
        model's reservation becomes weights + activation peak + graphs + pool + null block, and
        the sizing is logged.
        Runs on the event loop.

        Raises:
            KVPoolSizeError: the pool does not fit (the load fails; the message has the numbers).
        """
        entry = self._get(name)
        others = [e for e in self._entries.values() if e is not entry]
        asked, fraction = self.catalogue.kv_request(entry.spec)
        share = 1
        if asked is None and fraction is None:
            share += sum(1 for e in others if e.spec.kind is ModelKind.GENERATE and not e.holds_slot
                         and self.catalogue.kv_request(e.spec) == (None, None))
            if self.max_loaded_models is not None:
                free_slots = self.max_loaded_models - sum(1 for e in others if e.holds_slot)
                share = max(1, min(share, free_slots))
        # The model's devices: its span x the tightest of them (one device: the budget and the others' bytes).
        span = entry.placement
        used = [0] * len(self.budgets)
        for h in self._holders(others):
            for d in h.devices:
                used[d] += h.per_device
        sizing = size_kv_pool(
            budget_bytes=len(span) * min(self.budgets[d] for d in span), weights_bytes=weights_bytes,
            activation_bytes=activation_bytes, others_bytes=len(span) * max(used[d] for d in span),
            block_bytes=block_bytes, max_blocks=max_blocks,
            requested_bytes=asked, fraction=fraction, share=share, fallback_bytes=DEFAULT_KV_CACHE_BYTES,
            name=repr(name), graph_bytes=graph_bytes, extra_blocks=extra_blocks,
        )
        entry.reserved = sizing.reserved_bytes
        log.info("%s", sizing.describe(repr(name)))
        self._notify()
        return sizing

    def _ranks(self, entry: _Entry) -> int:
        """Devices ``entry`` spans: its tensor parallel size (on CPU, where the ranks share the host,
        at most the pod's slots).

        Raises:
            ValueError: a split model on GPUs needs more devices than the pod has.
        """
        tp, n = entry.spec.tensor_parallel_size, len(self.devices)
        if tp <= n:
            return tp
        if any(d.type == "cuda" for d in self.devices):
            raise ValueError(f"tensor parallel size {tp} needs {tp} GPUs; the pod has {n}")
        return n

    def _span_text(self, ranks: int) -> str:
        """`` (N bytes on each of R devices)``-style detail for messages of a pod with several devices."""
        if len(self.devices) == 1:
            return ""
        return f" ({ranks} contiguous device(s) of the pod's budgets {self.budgets})"

    def _holders(self, entries: list[_Entry]) -> list[Holder]:
        """What ``entries`` hold on the devices, for :func:`~.placement.place`."""
        return [
            Holder(e, e.placement, per_device_bytes(e.reserved, len(e.placement)), e.last_used,
                   evictable=(e.state is ModelState.LOADED and e.evicting is None and not e.spec.preload
                              and e.idle),
                   leaving=e.evicting is not None, slot=e.holds_slot)
            for e in entries if e.reserved > 0 or e.holds_slot
        ]

    async def _reserve(self, entry: _Entry, need: int) -> None:
        """Reserve ``need`` bytes (over the model's devices) and a model slot for ``entry``, choosing
        its devices and evicting idle models LRU-first (:func:`~.placement.place`).

        Raises:
            ModelUnavailableError: nothing more can be evicted within ``acquireTimeoutSeconds``
                (the message names the models that hold the memory), or shutdown began.
            ValueError: the model needs more GPUs than the pod has.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.catalogue.acquire_timeout_seconds
        ranks = self._ranks(entry)
        while True:
            if self._closing:
                raise ModelUnavailableError("the server is shutting down")
            others = [e for e in self._entries.values() if e is not entry]
            holders = self._holders(others)
            chosen = place(per_device_bytes(need, ranks), ranks, self.budgets, holders, self.max_loaded_models)
            if chosen is not None and self._fits_now(chosen.devices, need, ranks, holders):
                entry.placement, entry.reserved = chosen.devices, need
                return
            if chosen is not None:
                victims = [v for v in chosen.victims if isinstance(v, _Entry)]
                for v in victims:
                    self._start_unload(v, action="evict")
                pending = [e.evicting for e in others if e.evicting is not None]
                if pending:
                    await asyncio.wait([asyncio.shield(p) for p in pending])
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ModelUnavailableError(self._no_memory_message(entry, need), retry_after=RETRY_AFTER_SECONDS)
            await self._wait_change(remaining)

    def _fits_now(self, devices: tuple[int, ...], need: int, ranks: int, holders: list[Holder]) -> bool:
        """Whether ``need`` bytes over ``devices`` and a model slot fit with every holder counted."""
        used = [0] * len(self.budgets)
        for h in holders:
            for d in h.devices:
                used[d] += h.per_device
        slots = sum(1 for h in holders if h.slot)
        return (all(used[d] + per_device_bytes(need, ranks) <= self.budgets[d] for d in devices)
                and (self.max_loaded_models is None or slots + 1 <= self.max_loaded_models))

    def _no_memory_message(self, entry: _Entry, need: int) -> str:
        holders = []
        for e in self._entries.values():
            if e is entry or not e.holds_slot:
                continue
            why = ("preloaded" if e.spec.preload else "loading" if e.state is ModelState.LOADING
                   else f"{e.active} running, {e.waiting} waiting requests")
            holders.append(f"{e.name} ({why}, {e.reserved} bytes)")
        limit = f", maxLoadedModels {self.max_loaded_models}" if self.max_loaded_models else ""
        if len(self.devices) > 1:
            limit += f" (per device {self.device_used_bytes()} of {self.budgets})"
        return (
            f"no memory for model {entry.name!r} within {self.catalogue.acquire_timeout_seconds:g} s: it needs "
            f"{need} bytes, {self.used_bytes()} of {self.budget_bytes} are in use{limit}; busy models: "
            + ("; ".join(holders) or "none")
        )

    def _start_unload(self, entry: _Entry, *, action: str) -> None:
        """Take ``entry`` out of service now and release its memory in a task (``entry.evicting`` completes then)."""
        handle, entry.handle = entry.handle, None
        entry.state = ModelState.UNLOADED
        fut = asyncio.get_running_loop().create_future()
        entry.evicting = fut
        assert handle is not None
        self._spawn(self._unload(entry, handle, fut, action))

    async def _unload(self, entry: _Entry, handle: LoadedModel, fut: asyncio.Future, action: str) -> None:
        name, freed = entry.name, entry.reserved
        t0 = time.perf_counter()
        try:
            if handle.offload is not None and self.warm.accepts(handle.memory_bytes):
                snapshot = await handle.offload()
                dropped = self.warm.put(name, snapshot)
                if dropped:
                    log.info("warm tier dropped %s", ", ".join(dropped))
                del snapshot
            await handle.close()
        except Exception:  # noqa: BLE001 - the memory accounting is released regardless
            log.exception("unloading %s failed", name)
        finally:
            del handle
            self._free_device_memory()
            seconds = time.perf_counter() - t0
            entry.reserved = 0
            entry.evicting = None
            metrics.MODEL_LOADED_BYTES.labels(model_name=name).set(0)
            if action == "evict":
                metrics.MODEL_EVICTIONS.labels(model_name=name).inc()
            self.events.append(LoadEvent(name, action, seconds, freed))
            log.info("%s %s (%d bytes) in %.3f s", "evicted" if action == "evict" else "unloaded", name, freed, seconds)
            fut.set_result(None)
            self._notify()

    def _free_device_memory(self) -> None:
        """Collect dropped tensors and return cached CUDA blocks to the driver."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
