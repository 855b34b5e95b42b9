"""Parse and check an InferenceService ``spec`` (DESIGN.md section 3) into typed pydantic models.

The CRD schema and its CEL rules reject most bad specs at the API server; this module repeats
those checks (an object stored under an older CRD, or written with validation off, must not
crash the operator) and adds the ones a schema cannot express, e.g. a resource request above
its limit. Every failure becomes one :class:`InvalidSpecError` whose message names each bad
field, which the operator reports as ``Ready=False, reason=InvalidSpec``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal

from kubeinfer_serving.sources import DNS1123_SUBDOMAIN, ModelSource, parse_source
from kubernetes.utils import parse_quantity
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: What ``servedModelName`` may be: the serving catalogue's model-name rule (``_NAME_PATTERN`` of
#: serving/kubeinfer_serving/registry/catalogue.py; tests/operator/test_spec.py keeps them equal):
#: 1-128 letters, digits, ``.``, ``_``, ``:``, ``@``, ``+``, ``-``, ``/``, starting and ending with a letter or digit, so
#: Hugging Face ids (``meta-llama/Llama-3.1-8B-Instruct``) and vLLM served names fit.
SERVED_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._:@+/-]{0,126}[A-Za-z0-9])?$"

#: Where the serving pod finds pvc:// sources: pvc://CLAIM/PATH -> MODEL_STORE_ROOT/CLAIM/PATH.
MODEL_STORE_ROOT = "/mnt/models"


class InvalidSpecError(ValueError):
    """The spec cannot be served as written; ``str(err)`` is a readable list of the problems."""


def parse_model_source(uri: str) -> ModelSource:
    """Parse ``source`` as an InferenceService may write it (:func:`kubeinfer_serving.sources.parse_source`
    without the serving-only ``builtin://`` and plain paths).

    Raises:
        SourceError: a ValueError naming the form the URI broke.
    """
    return parse_source(uri, allow_local=False)


class _Camel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class AdapterSpec(_Camel):
    """One LoRA adapter of a model (``spec.models[].adapters``): an OpenAI model name and where
    its PEFT files (``adapter_config.json`` + ``adapter_model.safetensors``) come from."""

    name: str = Field(max_length=63)
    source: str = Field(max_length=256)
    #: the OpenAI ``model`` id clients send for this adapter; None: ``name``.
    served_model_name: str | None = Field(default=None, alias="servedModelName", max_length=128,
                                          pattern=SERVED_NAME_PATTERN)

    @property
    def served_name(self) -> str:
        """The id clients request: ``servedModelName``, else ``name``."""
        return self.served_model_name or self.name

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not DNS1123_LABEL.match(value):
            raise ValueError(f"adapter name {value!r} must be a DNS-1123 label")
        return value

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        parse_model_source(value)
        return value

    @property
    def parsed_source(self) -> ModelSource:
        """The parsed :class:`~kubeinfer_serving.sources.ModelSource` of ``source``."""
        return parse_model_source(self.source)


class ModelSpec(_Camel):
    """One entry of ``spec.models``: a DNS-safe key (``name``, used in Kubernetes objects, labels
    and ``status.models``), the OpenAI id clients send (``servedModelName``, default ``name``) and
    where its weights come from."""

    name: str = Field(max_length=63)
    source: str = Field(max_length=1024)
    #: the OpenAI ``model`` id clients send (any string :data:`SERVED_NAME_PATTERN` allows); None: ``name``.
    served_model_name: str | None = Field(default=None, alias="servedModelName", max_length=128,
                                          pattern=SERVED_NAME_PATTERN)
    preload: bool = False
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, alias="maxModelLen", ge=1, le=1 << 20)
    kind: Literal["generate", "embed"] = "generate"
    idle_timeout_seconds: int | None = Field(default=None, alias="idleTimeoutSeconds", ge=0, le=31536000)
    result_cache: bool = Field(default=False, alias="resultCache")
    kv_cache_bytes: int | None = Field(default=None, alias="kvCacheBytes", ge=1, le=1 << 44)
    kv_cache_fraction: float | None = Field(default=None, alias="kvCacheFraction", gt=0, le=1)
    #: decode CUDA graphs off for this model; None: ``runtime.enforceEager``.
    enforce_eager: bool | None = Field(default=None, alias="enforceEager")
    #: LoRA adapters served on this model, each under its own model name.
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=32)
    #: weight quantization of a generate model (kubeinfer_serving.layers.quant).
    quantization: Literal["none", "int8", "fp8"] = "none"
    #: GPUs of the pod (ranks) a generate model is split over (kubeinfer_serving.distributed).
    tensor_parallel_size: int = Field(default=1, alias="tensorParallelSize", ge=1, le=64)

    @model_validator(mode="after")
    def _one_kv_size(self) -> ModelSpec:
        if self.tensor_parallel_size > 1 and (self.kind != "generate" or self.adapters):
            raise ValueError("tensorParallelSize > 1 applies to kind generate without adapters")
        if self.adapters and self.kind != "generate":
            raise ValueError("adapters apply to kind generate only")
        if self.kv_cache_bytes is not None and self.kv_cache_fraction is not None:
            raise ValueError("set kvCacheBytes or kvCacheFraction, not both")
        if (self.kv_cache_bytes is not None or self.kv_cache_fraction is not None) and self.kind != "generate":
            raise ValueError("kvCacheBytes and kvCacheFraction apply to kind generate only")
        if self.enforce_eager is not None and self.kind != "generate":
            raise ValueError("enforceEager applies to kind generate only")
        if self.quantization != "none" and self.kind != "generate":
            raise ValueError("quantization applies to kind generate only")
        return self

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not DNS1123_LABEL.match(value):
            raise ValueError(f"model name {value!r} must be a DNS-1123 label")
        return value

    credentials_secret: str | None = Field(default=None, alias="credentialsSecret", max_length=253)

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        parse_model_source(value)
        return value

    @field_validator("credentials_secret")
    @classmethod
    def _secret_name(cls, value: str | None) -> str | None:
        if value is not None and not DNS1123_SUBDOMAIN.match(value):
            raise ValueError(f"credentialsSecret {value!r} must be a Secret name (DNS-1123 subdomain)")
        return value

    @property
    def parsed_source(self) -> ModelSource:
        """The parsed :class:`~kubeinfer_serving.sources.ModelSource` of ``source``."""
        return parse_model_source(self.source)

    @property
    def served_name(self) -> str:
        """The id clients request: ``servedModelName``, else ``name``."""
        return self.served_model_name or self.name


class RuntimeSpec(_Camel):
    """``spec.runtime``: serving image and engine limits (tokens, sequences, memory fraction)."""

    image: str | None = Field(default=None, max_length=512)
    max_loaded_models: int | None = Field(default=None, alias="maxLoadedModels", ge=1, le=32)
    gpu_memory_utilization: float = Field(default=0.9, alias="gpuMemoryUtilization", gt=0, le=1)
    max_num_seqs: int = Field(default=256, alias="maxNumSeqs", ge=1, le=65536)
    max_num_batched_tokens: int = Field(default=8192, alias="maxNumBatchedTokens", ge=1, le=1 << 20)
    max_waiting_requests: int = Field(default=1024, alias="maxWaitingRequests", ge=1, le=1 << 20)
    idle_timeout_seconds: int | None = Field(default=None, alias="idleTimeoutSeconds", ge=0, le=31536000)
    scheduling_policy: Literal["fcfs", "priority"] = Field(default="fcfs", alias="schedulingPolicy")
    #: decode CUDA graphs off for every generate model; None: the serving pod's default (graphs on
    #: where the engine can capture them).
    enforce_eager: bool | None = Field(default=None, alias="enforceEager")
    #: LoRA slots for every generate model (adapters can be added at run time); None: off.
    enable_lora: bool | None = Field(default=None, alias="enableLora")
    #: LoRA slots of each model with adapters and their highest rank; None: the serving pod's defaults.
    max_loras: int | None = Field(default=None, alias="maxLoras", ge=1, le=64)
    max_lora_rank: int | None = Field(default=None, alias="maxLoraRank", ge=1, le=512)


class ScalingSpec(_Camel):
    """``spec.scaling``: autoscaler bounds and behaviour; queue length is in waiting requests per pod.

    ``autoscaler`` picks who scales the Deployment: ``hpa`` (an autoscaling/v2 HPA on the Pods
    metric ``kubeinfer_queue_length``, served by prometheus-adapter), ``keda`` (a KEDA
    ScaledObject with a Prometheus trigger; KEDA owns the HPA and can scale to zero) or ``none``
    (a fixed size: ``spec.replicas``, which ``kubectl scale`` and other ``/scale`` clients set;
    ``minReplicas`` when unset).
    ``minReplicas`` 0 needs ``keda``; the Deployment then leaves zero when the isvc's queue
    (requests pending at its activator included) exceeds ``activationQueueLength`` (KEDA's
    ``activationThreshold``).
    """

    autoscaler: Literal["hpa", "keda", "none"] = "hpa"
    min_replicas: int = Field(default=1, alias="minReplicas", ge=0, le=1000)
    max_replicas: int = Field(default=1, alias="maxReplicas", ge=1, le=1000)
    target_queue_length: int = Field(default=8, alias="targetQueueLength", ge=1, le=100000)
    activation_queue_length: int = Field(default=0, alias="activationQueueLength", ge=0, le=100000)
    scale_down_stabilization_seconds: int = Field(
        default=300, alias="scaleDownStabilizationSeconds", ge=0, le=3600
    )
    prometheus_address: str | None = Field(default=None, alias="prometheusAddress", max_length=512)

    @model_validator(mode="after")
    def _bounds(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must be less than or equal to maxReplicas ({self.max_replicas})"
            )
        if self.min_replicas == 0 and self.autoscaler != "keda":
            raise ValueError("minReplicas 0 (scale to zero) needs autoscaler: keda; an HPA cannot scale to zero")
        if self.prometheus_address is not None and not re.match(r"^https?://[^\s/]+", self.prometheus_address):
            raise ValueError(f"prometheusAddress {self.prometheus_address!r} must be an http(s):// URL")
        return self


#: The extended resource of the pod's GPUs (what ``tensorParallelSize`` must divide).
GPU_RESOURCE = "nvidia.com/gpu"


def _is_extended_resource(name: str) -> bool:
    """Extended resources (e.g. ``nvidia.com/gpu``) are domain-prefixed outside ``kubernetes.io``."""
    return "/" in name and not name.split("/", 1)[0].endswith("kubernetes.io")


class ResourcesSpec(_Camel):
    """``spec.resources``: core/v1 ResourceRequirements of the serving container, passed through."""

    limits: dict[str, int | str] = Field(default_factory=dict)
    requests: dict[str, int | str] = Field(default_factory=dict)
    claims: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _quantities(self) -> ResourcesSpec:
        parsed: dict[str, dict[str, Decimal]] = {}
        for field in ("limits", "requests"):
            parsed[field] = {}
            for name, raw in getattr(self, field).items():
                try:
                    parsed[field][name] = parse_quantity(raw)
                except ValueError as err:
                    raise ValueError(f"{field}[{name}] = {raw!r} is not a Kubernetes quantity") from err
        for name, request in parsed["requests"].items():
            limit = parsed["limits"].get(name)
            if limit is None:
                continue
            if request > limit:
                raise ValueError(f"requests[{name}] ({self.requests[name]}) exceeds limits[{name}] ({self.limits[name]})")
            if _is_extended_resource(name) and request != limit:
                raise ValueError(f"requests[{name}] must equal limits[{name}]: extended resources cannot be overcommitted")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The ResourceRequirements object for the container, empty sections left out."""
        out: dict[str, Any] = {}
        if self.limits:
            out["limits"] = {k: str(v) for k, v in self.limits.items()}
        if self.requests:
            out["requests"] = {k: str(v) for k, v in self.requests.items()}
        if self.claims:
            out["claims"] = [dict(c) for c in self.claims]
        return out


class ModelCacheSpec(_Camel):
    """``spec.modelCache``: the pod's disk tier for ``hf://`` and ``s3://`` models.

    Attributes:
        size: a Kubernetes quantity (default ``20Gi``): the ``sizeLimit`` of the ``emptyDir``, or
            the part of the claim the pod may fill; the serving pod keeps fetched models within
            :data:`DISK_CACHE_FILL` of it and evicts least-recently-used ones beyond.
        claim_name: a PersistentVolumeClaim to keep the cache in (survives pod restarts) instead
            of an ``emptyDir``.
    """

    size: int | str = "20Gi"
    claim_name: str | None = Field(default=None, alias="claimName", max_length=253)

    @field_validator("size")
    @classmethod
    def _quantity(cls, value: int | str) -> int | str:
        try:
            if parse_quantity(value) < 1024 * 1024:
                raise ValueError(f"modelCache.size {value!r} is below 1Mi")
        except ValueError as err:
            raise ValueError(f"modelCache.size {value!r}: {err}") from err
        return value

    @field_validator("claim_name")
    @classmethod
    def _claim(cls, value: str | None) -> str | None:
        if value is not None and not DNS1123_SUBDOMAIN.match(value):
            raise ValueError(f"modelCache.claimName {value!r} is not a valid PersistentVolumeClaim name")
        return value

    @property
    def size_bytes(self) -> int:
        """``size`` in bytes."""
        return int(parse_quantity(self.size))


class RoutingSpec(_Camel):
    """``spec.routing``: how requests reach the serving pods.

    ``mode: router`` (the default) puts the fleet router (``kubeinfer-router``, Deployment
    ``NAME-router``) behind the isvc's Service: it sends each request to the pod that has its
    model resident (consistent hashing with bounded loads on model + prompt prefix or session),
    and holds requests while the isvc has no ready pod (scale from zero without client retries).
    ``mode: service`` is a plain Kubernetes Service over the serving pods (random spreading per
    connection; an activator answers 503 + Retry-After at zero).
    The strategy knobs are the router's flags of the same name (router/kubeinfer_router/config.py);
    ``resources`` are the router container's (default :data:`~kubeinfer_operator.render_router.ROUTER_RESOURCES`).
    """

    mode: Literal["router", "service"] = "router"
    load_factor: float = Field(default=1.25, alias="loadFactor", ge=1, le=100)
    virtual_nodes: int = Field(default=256, alias="virtualNodes", ge=1, le=4096)
    prefix_chars: int = Field(default=100, alias="prefixChars", ge=0, le=1000000)
    imbalance_min_requests: int = Field(default=64, alias="imbalanceMinRequests", ge=0, le=1000000)
    imbalance_ratio: float = Field(default=1.5, alias="imbalanceRatio", ge=1, le=1000)
    hold_timeout_seconds: int = Field(default=60, alias="holdTimeoutSeconds", ge=0, le=3600)
    max_held_requests: int = Field(default=1000, alias="maxHeldRequests", ge=0, le=1000000)
    replicas: int = Field(default=2, ge=1, le=100)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)


#: Fraction of ``modelCache.size`` the serving pod fills with model snapshots: the rest is headroom
#: for download metadata, so the kubelet never evicts the pod for exceeding the emptyDir's sizeLimit.
DISK_CACHE_FILL = 0.95


#: Pod volumes the operator itself renders: a ``spec.volumes`` entry may not take these names.
RESERVED_VOLUME_PREFIXES = ("catalogue", "tmp", "cache", "model-store-", "api-keys", "model-cache", "dshm")
#: Where ``spec.shmSize`` mounts its memory-backed emptyDir.
SHM_PATH = "/dev/shm"


def _named(items: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """``items`` unchanged when each has a unique string ``name``.

    Raises:
        ValueError: an entry without a name, or a repeated name.
    """
    names = [item.get("name") for item in items]
    if any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"every {what} entry needs a name")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")
    return items


class InferenceServiceSpec(_Camel):
    """The whole ``spec`` of an InferenceService, defaults filled in as the CRD schema does.

    The serving pod's knobs are explicit fields passed through to the pod (``serviceAccountName``,
    ``env``, ``envFrom``, ``podAnnotations``, ``podLabels``, ``runtimeClassName``,
    ``priorityClassName``, ``imagePullSecrets``, ``volumes``, ``volumeMounts``, ``shmSize``), not a
    whole PodSpec: the operator owns the container command, probes, security context and its own
    volumes, and each knob gets a schema, a description and a place in ``kubectl explain``.
    ``replicas`` is the scale subresource's ``specReplicasPath``: the serving pods with
    ``scaling.autoscaler: none``; the CRD refuses it with an autoscaler.
    """

    models: list[ModelSpec] = Field(max_length=32)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    api_keys_secret: str | None = Field(default=None, alias="apiKeysSecret", max_length=253,
                                        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    credentials_secret: str | None = Field(default=None, alias="credentialsSecret", max_length=253)
    model_cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec, alias="modelCache")
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    replicas: int | None = Field(default=None, ge=0, le=1000)
    service_account_name: str | None = Field(default=None, alias="serviceAccountName", max_length=253,
                                             pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    env: list[dict[str, Any]] = Field(default_factory=list, max_length=128)
    env_from: list[dict[str, Any]] = Field(default_factory=list, alias="envFrom", max_length=32)
    pod_annotations: dict[str, str] = Field(default_factory=dict, alias="podAnnotations")
    pod_labels: dict[str, str] = Field(default_factory=dict, alias="podLabels")
    runtime_class_name: str | None = Field(default=None, alias="runtimeClassName", max_length=253,
                                           pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    priority_class_name: str | None = Field(default=None, alias="priorityClassName", max_length=253,
                                            pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    image_pull_secrets: list[dict[str, str]] = Field(default_factory=list, alias="imagePullSecrets", max_length=16)
    volumes: list[dict[str, Any]] = Field(default_factory=list, max_length=32)
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list, alias="volumeMounts", max_length=32)
    shm_size: int | str | None = Field(default=None, alias="shmSize")

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return _named(value, "env")

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secret_names(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        return _named(value, "imagePullSecrets")

    @field_validator("volumes")
    @classmethod
    def _volume_names(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for volume in _named(value, "volumes"):
            if volume["name"].startswith(RESERVED_VOLUME_PREFIXES):
                raise ValueError(f"volume name {volume['name']!r} is reserved for the operator's own volumes "
                                 f"(names starting with {', '.join(RESERVED_VOLUME_PREFIXES)})")
        return value

    @field_validator("volume_mounts")
    @classmethod
    def _mounts(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for mount in value:
            if not mount.get("name") or not str(mount.get("mountPath", "")).startswith("/"):
                raise ValueError("every volumeMounts entry needs a name and an absolute mountPath")
        return value

    @field_validator("shm_size")
    @classmethod
    def _shm(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            try:
                parse_quantity(value)
            except ValueError as err:
                raise ValueError(f"shmSize {value!r} is not a Kubernetes quantity") from err
        return value

    @field_validator("credentials_secret")
    @classmethod
    def _secret_name(cls, value: str | None) -> str | None:
        if value is not None and not DNS1123_SUBDOMAIN.match(value):
            raise ValueError(f"credentialsSecret {value!r} must be a Secret name (DNS-1123 subdomain)")
        return value

    @model_validator(mode="after")
    def _models(self) -> InferenceServiceSpec:
        if not self.models:
            raise ValueError("spec.models must list at least one model")
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} appears more than once")
            seen.add(model.name)
        for model in self.models:
            for adapter in model.adapters:
                if adapter.name in seen:
                    raise ValueError(f"adapter name {adapter.name!r} of model {model.name!r} is already a model "
                                     "or adapter name (adapters are model names too)")
                seen.add(adapter.name)
        served: set[str] = set()
        for entry in self.sources():
            if entry.served_name in served:
                raise ValueError(f"served model id {entry.served_name!r} appears more than once among models and "
                                 "adapters (servedModelName, else name)")
            served.add(entry.served_name)
        if self.replicas is not None and self.scaling.autoscaler != "none":
            raise ValueError("replicas (kubectl scale) applies to scaling.autoscaler: none only; with an "
                             "autoscaler set scaling.minReplicas and scaling.maxReplicas")
        volumes = {v["name"] for v in self.volumes}
        for mount in self.volume_mounts:
            if mount["name"] not in volumes:
                raise ValueError(f"volumeMounts entry {mount['name']!r} names no entry of spec.volumes")
        gpus = self.resources.limits.get(GPU_RESOURCE)
        if gpus is not None:
            count = int(parse_quantity(gpus))
            for model in self.models:
                if count % model.tensor_parallel_size:
                    raise ValueError(f"model {model.name!r}: tensorParallelSize {model.tensor_parallel_size} does not "
                                     f"divide the pod's {count} {GPU_RESOURCE}")
        preloaded = sum(1 for m in self.models if m.preload)
        if self.runtime.max_loaded_models is not None and preloaded > self.runtime.max_loaded_models:
            raise ValueError(
                f"{preloaded} models have preload: true but runtime.maxLoadedModels is {self.runtime.max_loaded_models}"
            )
        return self

    @property
    def fixed_replicas(self) -> int | None:
        """Serving pods with ``scaling.autoscaler: none`` (``replicas``, else ``minReplicas``);
        None with an autoscaler (it owns the Deployment's replicas)."""
        if self.scaling.autoscaler != "none":
            return None
        return self.replicas if self.replicas is not None else self.scaling.min_replicas

    @property
    def max_loaded_models(self) -> int:
        """``runtime.maxLoadedModels``, or the number of models when unset (all may be resident)."""
        return self.runtime.max_loaded_models or len(self.models)

    @property
    def tensor_parallel(self) -> bool:
        """Whether any model is split over several ranks (the pod then needs a larger ``/dev/shm``)."""
        return any(m.tensor_parallel_size > 1 for m in self.models)

    @property
    def router_mode(self) -> bool:
        """Whether the fleet router fronts the serving pods (``routing.mode: router``)."""
        return self.routing.mode == "router"

    @property
    def remote_models(self) -> bool:
        """Whether any model is fetched over the network (``hf://``, ``s3://``) into the disk tier."""
        return any(s.parsed_source.remote for s in self.sources())

    def sources(self) -> list[ModelSpec | AdapterSpec]:
        """Every model and adapter, in order (each model followed by its adapters)."""
        return [s for m in self.models for s in (m, *m.adapters)]

    def model_secrets(self) -> list[str]:
        """Distinct per-model ``credentialsSecret`` names, in first-use order (index = env prefix number)."""
        out: list[str] = []
        for model in self.models:
            if model.credentials_secret and model.credentials_secret not in out:
                out.append(model.credentials_secret)
        return out

    def claims(self) -> list[str]:
        """Distinct PersistentVolumeClaim names used by pvc:// sources (models' and adapters'), in first-use order."""
        out: list[str] = []
        for model in self.sources():
            claim = model.parsed_source.claim
            if claim and claim not in out:
                out.append(claim)
        return out


def _location(loc: tuple[Any, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_spec(spec: Mapping[str, Any] | None, name: str | None = None) -> InferenceServiceSpec:
    """Validate ``spec`` (the object's ``.spec`` as a plain dict) and return it typed, defaults filled.

    Args:
        spec: the InferenceService ``spec`` mapping.
        name: ``metadata.name``; when given it must be a DNS-1035 label (it names the Service).

    Raises:
        InvalidSpecError: one message listing every problem, e.g.
            ``spec.scaling: minReplicas (3) must be less than or equal to maxReplicas (2)``.
    """
    problems: list[str] = []
    if name is not None and (len(name) > 63 or not DNS1035_LABEL.match(name)):
        problems.append(f"metadata.name {name!r} must be a DNS-1035 label (it names the Service)")
    parsed: InferenceServiceSpec | None = None
    try:
        parsed = InferenceServiceSpec.model_validate(dict(spec or {}))
    except ValidationError as err:
        for item in err.errors(include_url=False):
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{_location(item['loc'])}: {message}")
    if problems or parsed is None:
        raise InvalidSpecError("; ".join(problems))
    return parsed
