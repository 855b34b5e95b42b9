"""The model catalogue: which models a serving pod answers for, and its memory rules.

A YAML or JSON file (the operator renders it into a ConfigMap, DESIGN.md section 9), with
camelCase keys::

    maxLoadedModels: 2              # optional cap on models resident at once (all kinds)
    gpuMemoryUtilization: 0.9       # budget = this fraction of device memory ...
    # memoryBudgetBytes: 8589934592 # ... or an absolute budget in bytes (not both)
    # kvCacheBytes: 268435456       # KV pool per generate model (bytes); default: sized from the
                                    # budget (see "KV pool" below)
    warmCacheBytes: 0               # host-memory tier for evicted weights (bytes, 0 = off)
    acquireTimeoutSeconds: 30       # how long a request waits for memory to free up
    loadTimeoutSeconds: 600         # how long a request waits for a load to finish
    maxNumSeqs: 256                 # engine knobs applied to every generate model
    maxNumBatchedTokens: 8192
    blockSize: 16                   # tokens per KV-cache block: 16, 32, 64 or 128 (vLLM's block_size)
    maxWaitingRequests: 1024        # queue cap per generate model; beyond it HTTP 429 + Retry-After
    schedulingPolicy: fcfs          # fcfs | priority (requests' `priority`, lower first; vLLM's policies)
    enforceEager: false             # true: no decode CUDA graphs for any generate model (vLLM's enforce_eager)
    idleTimeoutSeconds: 1800        # unload a non-preloaded model idle this long (0/absent: never)
    resultCacheBytes: 67108864      # result cache size for the models with resultCache: true
    resultCacheTtlSeconds: 600
    pvcRoot: /mnt/models            # where pvc://CLAIM/PATH volumes are mounted
    diskCacheDir: /var/cache/kubeinfer/models   # disk tier of hf:// and s3:// models (default
                                    # $XDG_CACHE_HOME/kubeinfer/remote-models, else ~/.cache/...)
    diskCacheBytes: 21474836480     # its budget in bytes (LRU beyond it)
    models:
      - name: llama-1b              # the OpenAI `model` name
        source: pvc://model-store/llama-3.2-1b   # pvc://, file:///abs, hf://ORG/NAME[@REV],
                                                 # s3://BUCKET/PREFIX, plain path, builtin://NAME
        credentialsEnvPrefix: KUBEINFER_SECRET_0_  # read AWS_*/HF_* as this prefix + name first
        kind: generate              # generate | embed
        preload: true               # loaded at start-up, never evicted
        dtype: bfloat16             # auto | float32 | bfloat16 | float16
        maxModelLen: 4096           # tokens
        kvCacheBytes: 536870912     # this model's KV pool in bytes (overrides the pod's kvCacheBytes)
        # kvCacheFraction: 0.4      # ... or this fraction of the pod's budget (not both)
        idleTimeoutSeconds: 600     # this model's idle TTL (overrides the pod's)
        enforceEager: true          # this model's decode CUDA graphs off (overrides the pod's enforceEager)
        resultCache: false          # cache complete responses of deterministic requests (opt-in)
        quantization: none          # none | int8 (weight-only, per channel) | fp8 (CUDA only)
        tensorParallelSize: 1       # ranks (GPUs of the pod, or CPU processes) the model is split over
        # chatTemplate: chat.jinja  # a Jinja file (absolute or relative to the working directory) or
                                    # the template itself, replacing the tokenizer's (vLLM's --chat-template)
        adapters:                   # LoRA adapters of this (generate) model, PEFT format
          - name: llama-1b-sql      # an OpenAI `model` name: requests for it run on llama-1b with it
            source: s3://adapters/sql   # any source scheme models take (not builtin://)
    enableLora: false               # LoRA slots for every generate model (for /v1/load_lora_adapter)
    maxLoras: 4                     # LoRA slots per model with adapters (adapters one step can mix)
    maxLoraRank: 16                 # highest adapter rank those slots hold

The budget covers the weights, the activation peak, the decode CUDA graphs (with their null
block) and the KV pool of every loaded model (DESIGN.md section 5). KV pool of a generate model (:mod:`kubeinfer_serving.engine.kv_sizing`):
the entry's ``kvCacheBytes`` or ``kvCacheFraction`` x budget, else the pod's ``kvCacheBytes``;
with none of them, on CUDA an equal share of what the budget has left after the other models,
the weights, the activation peak of a profiling step at ``maxNumBatchedTokens`` and the measured
decode CUDA graphs with their null block (the share is
divided among the auto-sized generate models not loaded yet), and on CPU 256 MiB
(:data:`DEFAULT_KV_CACHE_BYTES`) capped by what is left. Always capped at what ``maxNumSeqs``
sequences of ``maxModelLen`` tokens can use. A model whose pool does not fit fails to load with
the numbers in its message; the other models keep serving.
``builtin://smollm2-135m-instruct``, ``builtin://tiny-llama`` and ``builtin://all-minilm-l6-v2`` name
the models shipped with the project (:mod:`kubeinfer_serving.models.builtin`); they resolve when
loaded, not when parsed. A source whose path ends in ``.gguf`` is a GGUF file
(:mod:`kubeinfer_serving.models.gguf`).
``hf://`` and ``s3://`` models are fetched into the disk tier when loaded (:mod:`.disk`, :mod:`.fetch`).
Source URIs are parsed by :func:`kubeinfer_serving.sources.parse_source` (shared with the operator).

Adapters are listed per model, not as a flat list with a ``base`` field: an adapter is only
meaningful with the base it was trained on, and nesting makes a dangling ``base`` impossible.
Their names share one namespace with the models (both are OpenAI ``model`` ids). A model with
adapters gets ``maxLoras`` slots of rank ``maxLoraRank`` (:mod:`kubeinfer_serving.lora`); its
adapters are read into host memory when the model loads, and count in its bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubeinfer_serving.config import (
    BLOCK_SIZES,
    Dtype,
    Quantization,
    SchedulingPolicy,
    canonical_dtype,
    fallback,
)
from kubeinfer_serving.models.builtin import (
    BUILTIN_CHAT_MODEL_NAME,
    BUILTIN_EMBEDDING_MODEL_NAME,
    BUILTIN_MODEL_NAME,
)
from kubeinfer_serving.registry.protocol import ModelKind
from kubeinfer_serving.sources import ModelSource, SourceError, parse_source

#: Environment variable naming the catalogue file (same as ``kubeinfer-serve --models-config``).
MODELS_CONFIG_ENV = "KUBEINFER_MODELS_CONFIG"
#: KV pool of an auto-sized generate model on CPU, where activation memory is not measured: 256 MiB
#: (capped by what the budget has left; the engine's CPU default).
DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
BUILTIN_SCHEME = "builtin://"
#: Default byte budget of the disk tier: 20 GiB.
DEFAULT_DISK_CACHE_BYTES = 20 * 1024**3


class CatalogueError(ValueError):
    """The catalogue file is missing, not YAML/JSON, or does not match the schema."""


class _CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._:@+/-]{0,126}[A-Za-z0-9])?$"


def _valid_source(source: str) -> str:
    """``source`` unchanged when :func:`~kubeinfer_serving.sources.parse_source` accepts it.

    Raises:
        ValueError: its message (pydantic reports it against the ``source`` field).
    """
    try:
        parse_source(source)
    except SourceError as exc:
        raise ValueError(str(exc)) from None
    return source


class AdapterEntry(_CamelModel):
    """One LoRA adapter of a model (PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``).

    Attributes:
        name: its OpenAI ``model`` name (same rules as a model's; unique among models and adapters).
        source: where the adapter directory is, any scheme a model's ``source`` takes but ``builtin://``.
        credentials_env_prefix: environment prefix of its own credentials (as a model's).
    """

    name: str = Field(pattern=_NAME_PATTERN)
    source: str = Field(min_length=1)
    credentials_env_prefix: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if v.startswith(BUILTIN_SCHEME):
            raise ValueError("an adapter's source cannot be builtin://")
        return _valid_source(v)

    @property
    def parsed_source(self) -> ModelSource:
        """The parsed :class:`~kubeinfer_serving.sources.ModelSource` of ``source``."""
        return parse_source(self.source)


class ModelEntry(_CamelModel):
    """One model of the catalogue (see the module docstring for the file format).

    Attributes:
        name: the OpenAI ``model`` name; letters, digits, ``.``, ``_``, ``:``, ``@``, ``+``, ``-``, ``/`` (1-128 chars,
            starting and ending with a letter or digit; ``org/name`` as vLLM users name models).
        source: ``pvc://CLAIM/PATH``, ``file:///abs/path``, ``hf://ORG/NAME[/FILE.gguf][@REVISION]``,
            ``s3://BUCKET/PREFIX``, a plain local path, or ``builtin://NAME``.
        kind: generate (completions, chat) or embed (``/v1/embeddings``).
        preload: loaded by ``start()`` and never evicted.
        dtype: weights/KV dtype; ``auto`` = bfloat16 on CUDA, float32 on CPU.
        max_model_len: context length in tokens; default the model's own.
        kv_cache_bytes: this generate model's KV pool in bytes; default the pod's ``kvCacheBytes``.
        kv_cache_fraction: this generate model's KV pool as a fraction (0, 1] of the pod's memory
            budget; exclusive with ``kv_cache_bytes``. Neither (nor a pod ``kvCacheBytes``): sized
            from what is left (see the module docstring).
        idle_timeout_seconds: unload this model after that long without requests (not when
            preloaded); None: the pod's ``idleTimeoutSeconds``; 0: never.
        credentials_env_prefix: environment prefix of this model's own credentials Secret
            (:func:`kubeinfer_serving.registry.fetch.credential_env`); None: the pod-level variables only.
        enforce_eager: run this generate model's decode steps eagerly, never as CUDA graphs
            (vLLM's ``enforce_eager``); None: the pod's ``enforceEager``.
        adapters: its LoRA adapters (generate models only).
        quantization: weight quantization of a generate model's decoder projections: ``int8``
            (weight-only, per-channel scales, CPU and CUDA), ``fp8`` (e4m3, CUDA with compute
            capability 8.9+; refused elsewhere, failing the model with the reason) or ``none``
            (:mod:`kubeinfer_serving.layers.quant`). The budget and ``/v1/models`` count the
            quantized bytes.
        tensor_parallel_size: ranks a generate model is split over (:mod:`kubeinfer_serving.distributed`):
            rank r on ``cuda:r`` (CPU: processes sharing the host). Its heads must divide (the load
            fails naming the numbers otherwise); no LoRA adapters with it; the budget counts every rank.
        chat_template: the chat template replacing the tokenizer's: a Jinja file's path, or the
            template itself (vLLM's ``--chat-template``; :func:`read_chat_template`). None: the tokenizer's.
    """

    name: str = Field(pattern=_NAME_PATTERN)
    source: str = Field(min_length=1)
    kind: ModelKind = ModelKind.GENERATE
    preload: bool = False
    dtype: Dtype = "auto"
    max_model_len: int | None = Field(default=None, ge=2)
    kv_cache_bytes: int | None = Field(default=None, ge=1)
    kv_cache_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    idle_timeout_seconds: float | None = Field(default=None, ge=0)
    result_cache: bool = False
    credentials_env_prefix: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    enforce_eager: bool | None = None
    adapters: list[AdapterEntry] = Field(default_factory=list)
    quantization: Quantization = "none"
    tensor_parallel_size: int = Field(default=1, ge=1)
    chat_template: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kv_size(self) -> ModelEntry:
        if self.tensor_parallel_size > 1 and (self.kind is not ModelKind.GENERATE or self.adapters):
            raise ValueError("tensorParallelSize > 1 applies to generate models without LoRA adapters")
        if self.kv_cache_bytes is not None and self.kv_cache_fraction is not None:
            raise ValueError("set kvCacheBytes or kvCacheFraction, not both")
        if self.adapters and self.kind is not ModelKind.GENERATE:
            raise ValueError("only generate models take LoRA adapters")
        if self.quantization != "none" and self.kind is not ModelKind.GENERATE:
            raise ValueError("quantization applies to generate models only")
        return self

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        return _valid_source(v)

    @property
    def parsed_source(self) -> ModelSource:
        """The parsed :class:`~kubeinfer_serving.sources.ModelSource` of ``source``."""
        return parse_source(self.source)


class Catalogue(_CamelModel):
    """The whole catalogue file: models plus pod-level limits (see the module docstring).

    Attributes:
        models: the entries; names are unique.
        max_loaded_models: most models resident at once, or None for no count limit.
        memory_budget_bytes: budget for weights + KV pools in bytes (exclusive with the fraction).
        gpu_memory_utilization: budget as a fraction of device memory (physical/cgroup memory on CPU);
            used when ``memory_budget_bytes`` is not set; default 0.9.
        kv_cache_bytes: KV pool of every generate model without its own ``kvCacheBytes`` /
            ``kvCacheFraction``, bytes; None: sized from the budget (see the module docstring).
        warm_cache_bytes: host-memory bytes for weights of evicted models (0 disables the warm tier).
        acquire_timeout_seconds: longest wait for memory to be freed before HTTP 503.
        load_timeout_seconds: longest wait of a request for a load in progress before HTTP 503.
        max_num_seqs, max_num_batched_tokens: engine knobs of every generate model.
        block_size: tokens per KV-cache block of every generate model (16, 32, 64 or 128).
        max_waiting_requests: waiting-queue cap of every generate model; requests beyond it get HTTP 429.
        pvc_root: mount point of ``pvc://`` claims.
        scheduling_policy: ``fcfs`` or ``priority`` for every generate model.
        idle_timeout_seconds: idle TTL of non-preloaded models, seconds (None or 0: never unloaded for idleness).
        disk_cache_dir: directory of the disk tier for ``hf://``/``s3://`` models (None: the user cache).
        disk_cache_bytes: byte budget of the disk tier.
        enable_lora: give every generate model LoRA slots, so adapters can be added at run time
            (``/v1/load_lora_adapter``) to models without catalogue adapters (vLLM's ``enable_lora``).
        max_loras: LoRA slots of each model with adapters (vLLM's ``max_loras``).
        max_lora_rank: the highest adapter rank the slots hold (vLLM's ``max_lora_rank``).
        enforce_eager: run every generate model's decode steps eagerly, never as CUDA graphs
            (vLLM's ``enforce_eager``; a model's own ``enforceEager`` overrides it). The default
            is the engine's (:attr:`kubeinfer_serving.engine.config.EngineConfig.enforce_eager`):
            graphs on where the engine can capture them (CUDA with the Triton kernels).
    """

    models: list[ModelEntry] = Field(min_length=1)
    max_loaded_models: int | None = Field(default=None, ge=1)
    memory_budget_bytes: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    kv_cache_bytes: int | None = Field(default=None, ge=1)
    warm_cache_bytes: int = Field(default=0, ge=0)
    acquire_timeout_seconds: float = Field(default=30.0, gt=0)
    load_timeout_seconds: float = Field(default=600.0, gt=0)
    max_num_seqs: int = Field(default=fallback("max_num_seqs"), ge=1)
    max_num_batched_tokens: int = Field(default=fallback("max_num_batched_tokens"), ge=1)
    max_waiting_requests: int = Field(default=fallback("max_waiting_requests"), ge=1)
    block_size: Literal[BLOCK_SIZES] = fallback("block_size")  # type: ignore[valid-type]
    pvc_root: str = "/mnt/models"
    scheduling_policy: SchedulingPolicy = fallback("scheduling_policy")
    idle_timeout_seconds: float | None = Field(default=None, ge=0)
    result_cache_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    result_cache_ttl_seconds: float = Field(default=600.0, gt=0)
    disk_cache_dir: str | None = None
    disk_cache_bytes: int = Field(default=DEFAULT_DISK_CACHE_BYTES, ge=1)
    enforce_eager: bool = fallback("enforce_eager")
    enable_lora: bool = fallback("enable_lora")
    max_loras: int = Field(default=fallback("max_loras"), ge=1)
    max_lora_rank: int = Field(default=fallback("max_lora_rank"), ge=1)

    @model_validator(mode="after")
    def _check(self) -> Catalogue:
        names = [m.name for m in self.models] + [a.name for m in self.models for a in m.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model and adapter names must be unique; repeated: {', '.join(dupes)}")
        if self.memory_budget_bytes is not None and self.gpu_memory_utilization is not None:
            raise ValueError("set memoryBudgetBytes or gpuMemoryUtilization, not both")
        return self

    def resolved_disk_cache_dir(self) -> Path:
        """``diskCacheDir``, else ``$XDG_CACHE_HOME/kubeinfer/remote-models`` (``~/.cache`` without it)."""
        if self.disk_cache_dir:
            return Path(self.disk_cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        return Path(base).expanduser() / "kubeinfer" / "remote-models"

    def kv_request(self, entry: ModelEntry) -> tuple[int | None, float | None]:
        """``(bytes, fraction)`` the KV pool of ``entry`` asks for: its own, else the pod's
        ``kvCacheBytes``; ``(None, None)``: sized from what the budget has left."""
        if entry.kv_cache_fraction is not None:
            return None, entry.kv_cache_fraction
        return entry.kv_cache_bytes or self.kv_cache_bytes, None

    def enforce_eager_for(self, entry: ModelEntry) -> bool:
        """Whether ``entry``'s engine runs decode steps eagerly: its own ``enforceEager``, else the pod's."""
        return self.enforce_eager if entry.enforce_eager is None else entry.enforce_eager

    def entry(self, name: str) -> ModelEntry | None:
        """The entry called ``name``, or None."""
        return next((m for m in self.models if m.name == name), None)

    def adapter(self, name: str) -> tuple[ModelEntry, AdapterEntry] | None:
        """(base model entry, adapter entry) of the adapter called ``name``, or None."""
        return next(((m, a) for m in self.models for a in m.adapters if a.name == name), None)


def parse_catalogue(data: object, *, origin: str = "catalogue") -> Catalogue:
    """Validate already-parsed YAML/JSON data.

    Raises:
        CatalogueError: the data does not match the schema (message lists every problem with its key path).
    """
    try:
        return Catalogue.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise CatalogueError(f"invalid {origin}: {problems}") from exc


def load_catalogue(path: str | Path) -> Catalogue:
    """Read a catalogue file (YAML or JSON; JSON is YAML).

    Raises:
        CatalogueError: the file cannot be read or parsed, or fails validation; the message names the file.
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogueError(f"cannot read models config {p}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise CatalogueError(f"models config {p} is not valid YAML/JSON: {exc}") from exc
    return parse_catalogue(data, origin=f"models config {p}")


def default_catalogue() -> Catalogue:
    """The built-in catalogue, every model preloaded: ``smollm2-135m-instruct`` (the real chat model
    of the README's demo), ``tiny-llama`` (generate, random weights) and ``all-minilm-l6-v2`` (embed).

    Cheap to call: the built-in models are built (once per machine) only when the registry loads them.
    """
    return Catalogue(
        models=[
            ModelEntry(name=BUILTIN_CHAT_MODEL_NAME, source=BUILTIN_SCHEME + BUILTIN_CHAT_MODEL_NAME,
                       kind=ModelKind.GENERATE, preload=True),
            ModelEntry(name=BUILTIN_MODEL_NAME, source=BUILTIN_SCHEME + BUILTIN_MODEL_NAME,
                       kind=ModelKind.GENERATE, preload=True),
            ModelEntry(name=BUILTIN_EMBEDDING_MODEL_NAME, source=BUILTIN_SCHEME + BUILTIN_EMBEDDING_MODEL_NAME,
                       kind=ModelKind.EMBED, preload=True),
        ]
    )


def default_served_name(source: str) -> str:
    """The OpenAI ``model`` name single-model mode gives ``source`` without ``--served-model-name``.

    ``builtin://NAME`` -> NAME; ``hf://ORG/NAME[@REV]`` -> ``ORG/NAME`` (as vLLM names hub models);
    ``s3://BUCKET/PREFIX`` -> the prefix's last part (else the bucket); a directory or file
    (plain, ``file://``, ``pvc://``) -> its name, a ``.gguf`` suffix dropped.

    Raises:
        CatalogueError: ``source`` is not a valid source.
    """
    try:
        src = parse_source(source)
    except SourceError as exc:
        raise CatalogueError(str(exc)) from None
    if src.scheme in ("builtin", "hf"):
        return src.path
    if src.scheme == "s3":
        return src.path.rsplit("/", 1)[-1] or str(src.bucket)
    path = Path(src.path).expanduser()
    name = (path.resolve() if src.scheme == "path" else path).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def single_model_catalogue(source: str | Path, name: str, *, dtype: str | None = None,
                           max_model_len: int | None = None, result_cache: bool = False,
                           quantization: str | None = None, adapters: list[dict[str, str]] | None = None,
                           tensor_parallel_size: int | None = None, chat_template: str | None = None,
                           **pod: object) -> Catalogue:
    """The one-entry catalogue of single-model mode (``kubeinfer-serve --model SOURCE``).

    Args:
        source: any catalogue source (``hf://``, ``s3://``, ``file://``, ``pvc://``, ``builtin://``)
            or a local directory or ``.gguf`` file (made absolute).
        name: the OpenAI ``model`` name (``--served-model-name``).
        dtype: ``--dtype`` (``bfloat16``/``bf16``, ``float16``/``fp16``/``half``, ``float32``/``fp32``,
            ``auto``); None: auto.
        max_model_len: ``--max-model-len``; None: the model's own.
        result_cache: ``--result-cache``.
        quantization: ``--quantization`` (``int8``, ``fp8``, ``none``); None: none.
        adapters: ``--lora-modules`` as ``[{name, source}]`` (a plain path is a local directory).
        tensor_parallel_size: ``--tensor-parallel-size``; None: 1.
        chat_template: ``--chat-template``: a file's path or the template itself (as vLLM takes it).
        pod: pod-level fields by their Python names (``max_num_seqs=4``, ``kv_cache_bytes=...``).

    Returns:
        a catalogue whose only model is preloaded (never evicted, gates ``/ready``).

    Raises:
        CatalogueError: an unknown dtype, a bad source, name or value (the message names the field).
    """
    try:
        canonical = canonical_dtype(dtype)
    except ValueError as exc:
        raise CatalogueError(str(exc)) from None
    text = str(source)
    try:
        local = parse_source(text).scheme == "path"
    except SourceError as exc:
        raise CatalogueError(str(exc)) from None
    model = {"name": name, "source": str(Path(text).expanduser().resolve()) if local else text,
             "kind": ModelKind.GENERATE, "preload": True, "dtype": canonical,
             "max_model_len": max_model_len, "result_cache": result_cache, "adapters": adapters or []}
    if quantization is not None:
        model["quantization"] = quantization
    if tensor_parallel_size is not None:
        model["tensor_parallel_size"] = tensor_parallel_size
    if chat_template is not None:
        model["chat_template"] = chat_template
    return parse_catalogue({"models": [model], **pod}, origin=f"single-model configuration of {name!r}")


def catalogue_from_config(path: str | Path | None = None) -> Catalogue:
    """The catalogue ``kubeinfer-serve`` uses: ``path`` if given, else ``$KUBEINFER_MODELS_CONFIG``, else the default.

    Raises:
        CatalogueError: as :func:`load_catalogue`.
    """
    chosen = path if path else os.environ.get(MODELS_CONFIG_ENV)
    return load_catalogue(chosen) if chosen else default_catalogue()


def read_chat_template(value: str) -> str:
    """The template text of a ``chatTemplate`` value: the file's contents when ``value`` names an existing
    file, else ``value`` itself (vLLM's rule for ``--chat-template``).

    Raises:
        CatalogueError: the file exists but cannot be read.
    """
    path = Path(value).expanduser()
    try:
        is_file = "\n" not in value and "{" not in value and path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        return value
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogueError(f"cannot read the chat template {path}: {exc.strerror or exc}") from exc
