"""The catalogue child: the serving pod's ``models.yaml`` in ConfigMap ``NAME-models``.

Pure (spec in, dicts and text out); the format is serving/kubeinfer_serving/registry/catalogue.py's.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from kubeinfer_operator.config import GROUP
from kubeinfer_operator.render_base import Owner, child_metadata
from kubeinfer_operator.spec import DISK_CACHE_FILL, MODEL_STORE_ROOT, InferenceServiceSpec

CATALOGUE_DIR = "/etc/kubeinfer"
CATALOGUE_FILE = "models.yaml"
CACHE_DIR = "/var/cache/kubeinfer"
#: Mount point of the disk tier of hf:// and s3:// models (an emptyDir with sizeLimit, or spec.modelCache.claimName).
MODEL_CACHE_DIR = f"{CACHE_DIR}/models"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"


def configmap_name(name: str) -> str:
    """Name of the catalogue ConfigMap of InferenceService ``name``."""
    return f"{name}-models"


def render_catalogue(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The serving pod's model catalogue as a dict (written as ``models.yaml``).

    Format of serving/kubeinfer_serving/registry/catalogue.py: ``{maxLoadedModels,
    gpuMemoryUtilization, maxNumSeqs, maxNumBatchedTokens, maxWaitingRequests, pvcRoot, enforceEager?, models: [{name,
    source, kind, preload, dtype, maxModelLen?, idleTimeoutSeconds?, resultCache?, kvCacheBytes?, kvCacheFraction?,
    enforceEager?, quantization?, tensorParallelSize?, credentialsEnvPrefix?, adapters?: [{name, source}]}], enableLora?, maxLoras?,
    maxLoraRank?, diskCacheDir?, diskCacheBytes?}``.
    A catalogue entry's ``name`` is the OpenAI id the pod serves, so it is the spec's
    ``servedModelName`` (default ``name``) of each model and adapter.
    ``gpuMemoryUtilization`` is the fraction of device memory for weights + KV cache of all loaded
    models; ``pvcRoot`` is where pvc:// claims are mounted, so ``pvc://CLAIM/PATH`` reads
    ``/mnt/models/CLAIM/PATH``. With hf:// or s3:// models the disk tier lives at
    :data:`MODEL_CACHE_DIR` with :data:`~kubeinfer_operator.spec.DISK_CACHE_FILL` of ``modelCache.size``.
    """
    models = []
    secrets = spec.model_secrets()
    for m in spec.models:
        entry: dict[str, Any] = {
            "name": m.served_name,
            "source": m.source,
            "kind": m.kind,
            "preload": m.preload,
            "dtype": m.dtype,
        }
        if m.max_model_len is not None:
            entry["maxModelLen"] = m.max_model_len
        if m.idle_timeout_seconds is not None:
            entry["idleTimeoutSeconds"] = m.idle_timeout_seconds
        if m.result_cache:
            entry["resultCache"] = True
        if m.kv_cache_bytes is not None:
            entry["kvCacheBytes"] = m.kv_cache_bytes
        if m.kv_cache_fraction is not None:
            entry["kvCacheFraction"] = m.kv_cache_fraction
        if m.enforce_eager is not None:
            entry["enforceEager"] = m.enforce_eager
        if m.quantization != "none":
            entry["quantization"] = m.quantization
        if m.tensor_parallel_size > 1:
            entry["tensorParallelSize"] = m.tensor_parallel_size
        if m.credentials_secret:
            entry["credentialsEnvPrefix"] = secret_env_prefix(secrets.index(m.credentials_secret))
        if m.adapters:
            entry["adapters"] = [{"name": a.served_name, "source": a.source} for a in m.adapters]
        models.append(entry)
    out: dict[str, Any] = {
        "maxLoadedModels": spec.max_loaded_models,
        "gpuMemoryUtilization": spec.runtime.gpu_memory_utilization,
        "maxNumSeqs": spec.runtime.max_num_seqs,
        "maxNumBatchedTokens": spec.runtime.max_num_batched_tokens,
        "maxWaitingRequests": spec.runtime.max_waiting_requests,
        "pvcRoot": MODEL_STORE_ROOT,
    }
    if spec.runtime.idle_timeout_seconds is not None:
        out["idleTimeoutSeconds"] = spec.runtime.idle_timeout_seconds
    if spec.runtime.scheduling_policy != "fcfs":
        out["schedulingPolicy"] = spec.runtime.scheduling_policy
    if spec.runtime.enforce_eager is not None:
        out["enforceEager"] = spec.runtime.enforce_eager
    if spec.runtime.enable_lora is not None:
        out["enableLora"] = spec.runtime.enable_lora
    if spec.runtime.max_loras is not None:
        out["maxLoras"] = spec.runtime.max_loras
    if spec.runtime.max_lora_rank is not None:
        out["maxLoraRank"] = spec.runtime.max_lora_rank
    if spec.remote_models:
        out["diskCacheDir"] = MODEL_CACHE_DIR
        out["diskCacheBytes"] = int(spec.model_cache.size_bytes * DISK_CACHE_FILL)
    out["models"] = models
    return out


def secret_env_prefix(index: int) -> str:
    """Env-var prefix under which the ``index``-th distinct per-model ``credentialsSecret`` is mounted."""
    return f"KUBEINFER_SECRET_{index}_"


def catalogue_yaml(spec: InferenceServiceSpec) -> str:
    """``models.yaml`` text: deterministic (key order fixed), so equal specs give equal bytes."""
    return yaml.safe_dump(render_catalogue(spec), sort_keys=False, default_flow_style=False)


def config_hash(catalogue: str) -> str:
    """First 16 hex digits of SHA-256 over the catalogue text; a change rolls the Deployment."""
    return hashlib.sha256(catalogue.encode()).hexdigest()[:16]


def render_configmap(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The catalogue ConfigMap ``NAME-models`` with key ``models.yaml``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(owner, configmap_name(owner.name)),
        "data": {CATALOGUE_FILE: catalogue_yaml(spec)},
    }
