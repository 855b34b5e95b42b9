"""Pure renderers: an InferenceService (name, uid, parsed spec) -> the child objects as plain dicts.

No I/O here; the reconciler applies what these return with server-side apply, so every field
set below is owned by the operator's field manager and anything not set (the Deployment's
``replicas``, which the HPA owns; server defaults) is left to others.
Children (DESIGN.md section 4): ConfigMap ``NAME-models`` (the catalogue), Deployment ``NAME``,
Service ``NAME`` (port 80 -> 8000), in ``routing.mode: router`` (the default) the fleet router's
objects (:mod:`kubeinfer_operator.render_router`), and the autoscaler: HorizontalPodAutoscaler
``NAME`` (autoscaling/v2, ``scaling.autoscaler: hpa``) or KEDA ScaledObject ``NAME`` (``keda``;
KEDA then creates and owns HorizontalPodAutoscaler ``keda-hpa-NAME``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import yaml

from kubeinfer_operator.config import GROUP, OPERATOR_UID, SERVING_UID, OperatorConfig
from kubeinfer_operator.render_base import (
    ACTIVATOR,
    ISVC_LABEL,
    PRESTOP_SECONDS,
    SERVICE_PORT,
    SERVING_PORT,
    Owner,
    common_labels,
    container_security_context,
    pod_selector,
    scrape_annotations,
    selector_labels,
)
from kubeinfer_operator.render_base import child_metadata as _metadata
from kubeinfer_operator.render_router import ROUTER_KINDS, render_router_objects, router_name, router_selector
from kubeinfer_operator.spec import DISK_CACHE_FILL, MODEL_STORE_ROOT, InferenceServiceSpec

CATALOGUE_DIR = "/etc/kubeinfer"
CATALOGUE_FILE = "models.yaml"
CACHE_DIR = "/var/cache/kubeinfer"
#: Where the Secret named by ``spec.apiKeysSecret`` is mounted, and its key read by the serving pod.
API_KEYS_DIR = "/etc/kubeinfer-keys"
API_KEYS_FILE = "keys.yaml"
#: ``sizeLimit`` of the memory-backed ``/dev/shm`` of pods with a tensor-parallel model (it counts
#: against the container's memory; a container's default ``/dev/shm`` is 64 MiB).
DEV_SHM_SIZE = "1Gi"
#: Mount point of the disk tier of hf:// and s3:// models (an emptyDir with sizeLimit, or spec.modelCache.claimName).
MODEL_CACHE_DIR = f"{CACHE_DIR}/models"
MODEL_CACHE_VOLUME = "model-cache"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
#: The queue-length series the serving pod exports (serving/kubeinfer_serving/metrics.py).
QUEUE_METRIC = "kubeinfer_queue_length"
#: Requests running in a serving pod (serving/kubeinfer_serving/metrics.py).
RUNNING_METRIC = "kubeinfer_num_requests_running"
#: Requests held by a router while no serving pod is ready (router/kubeinfer_router/metrics.py).
ROUTER_HELD_METRIC = "kubeinfer_router_held_requests"
#: Requests pending at an activator (kubeinfer_operator/activator.py).
ACTIVATOR_METRIC = "kubeinfer_activator_pending_requests"
#: Seconds a refused request counts as pending at the activator (a few Prometheus scrape and
#: KEDA polling intervals).
ACTIVATOR_WINDOW_SECONDS = 60
SCALED_OBJECT_API_VERSION = "keda.sh/v1alpha1"


def configmap_name(name: str) -> str:
    """Name of the catalogue ConfigMap of InferenceService ``name``."""
    return f"{name}-models"


def service_url(name: str, namespace: str) -> str:
    """The in-cluster URL clients use: ``http://NAME.NAMESPACE.svc.cluster.local``."""
    return f"http://{name}.{namespace}.svc.cluster.local"


def service_selector(name: str, spec: InferenceServiceSpec | None = None) -> dict[str, str]:
    """Pod selector of the Service ``NAME``: in router mode (the default) the router pods; in
    service mode the isvc's serving pods and, while it has none ready, its activator pod
    (:func:`render_activator`)."""
    if spec is None or spec.router_mode:
        return router_selector(name)
    return {ISVC_LABEL: name}


def activator_name(name: str) -> str:
    """Name of the activator Deployment of isvc ``name`` (its pods: ``NAME-activator-<hash>-<suffix>``)."""
    return f"{name}-activator"


def render_catalogue(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The serving pod's model catalogue as a dict (written as ``models.yaml``).

    Format of serving/kubeinfer_serving/registry/catalogue.py: ``{maxLoadedModels,
    gpuMemoryUtilization, maxNumSeqs, maxNumBatchedTokens, maxWaitingRequests, pvcRoot, enforceEager?, models: [{name,
    source, kind, preload, dtype, maxModelLen?, idleTimeoutSeconds?, resultCache?, kvCacheBytes?, kvCacheFraction?,
    enforceEager?, quantization?, tensorParallelSize?, credentialsEnvPrefix?, adapters?: [{name, source}]}], enableLora?, maxLoras?,
    maxLoraRank?, diskCacheDir?, diskCacheBytes?}``.
    ``gpuMemoryUtilization`` is the fraction of device memory for weights + KV cache of all loaded
    models; ``pvcRoot`` is where pvc:// claims are mounted, so ``pvc://CLAIM/PATH`` reads
    ``/mnt/models/CLAIM/PATH``. With hf:// or s3:// models the disk tier lives at
    :data:`MODEL_CACHE_DIR` with :data:`~kubeinfer_operator.spec.DISK_CACHE_FILL` of ``modelCache.size``.
    """
    models = []
    secrets = spec.model_secrets()
    for m in spec.models:
        entry: dict[str, Any] = {
            "name": m.name,
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
            entry["adapters"] = [{"name": a.name, "source": a.source} for a in m.adapters]
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


def credential_env_from(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """``envFrom`` entries of the serving container: the pod-level ``credentialsSecret`` as plain
    variables (``AWS_ACCESS_KEY_ID``, ``HF_TOKEN``, ...), and each per-model Secret under its
    :func:`secret_env_prefix`; the catalogue names only the prefix, never a value."""
    out: list[dict[str, Any]] = []
    if spec.credentials_secret:
        out.append({"secretRef": {"name": spec.credentials_secret}})
    for index, name in enumerate(spec.model_secrets()):
        out.append({"prefix": secret_env_prefix(index), "secretRef": {"name": name}})
    return out


def model_cache_volume(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The disk-tier volume: the named PersistentVolumeClaim, else an emptyDir with ``sizeLimit``."""
    if spec.model_cache.claim_name:
        return {"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": spec.model_cache.claim_name}}
    return {"name": MODEL_CACHE_VOLUME, "emptyDir": {"sizeLimit": str(spec.model_cache.size)}}


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
        "metadata": _metadata(owner, configmap_name(owner.name)),
        "data": {CATALOGUE_FILE: catalogue_yaml(spec)},
    }


def serving_args(config: OperatorConfig) -> list[str]:
    """``kubeinfer-serve`` command line (flags of serving/kubeinfer_serving/config.py); the engine
    knobs (maxNumSeqs, maxNumBatchedTokens, maxWaitingRequests, enforceEager) travel in the catalogue."""
    return [
        "kubeinfer-serve",
        "--host", "0.0.0.0",
        "--port", str(SERVING_PORT),
        "--models-config", f"{CATALOGUE_DIR}/{CATALOGUE_FILE}",
        "--timeout-graceful-shutdown", str(config.drain_seconds),
    ]


def _volume_name(index: int) -> str:
    return f"model-store-{index}"


def render_deployment(
    owner: Owner, spec: InferenceServiceSpec, config: OperatorConfig, catalogue_hash: str
) -> dict[str, Any]:
    """The serving Deployment ``NAME``; ``replicas`` is left out (the HPA owns it).

    Args:
        catalogue_hash: :func:`config_hash` of the catalogue, put on the pod template so a
            catalogue change rolls the pods.
    """
    labels = common_labels(owner.name)
    volumes: list[dict[str, Any]] = [
        {"name": "catalogue", "configMap": {"name": configmap_name(owner.name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "catalogue", "mountPath": CATALOGUE_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]
    for index, claim in enumerate(spec.claims()):
        volumes.append(
            {"name": _volume_name(index), "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": _volume_name(index), "mountPath": f"{MODEL_STORE_ROOT}/{claim}", "readOnly": True})
    if spec.api_keys_secret:  # API keys and tenants (serving reads KUBEINFER_API_KEYS_FILE)
        volumes.append({"name": "api-keys", "secret": {"secretName": spec.api_keys_secret, "defaultMode": 0o440}})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    needs_hub = any(m.parsed_source.scheme == "hf" for m in spec.sources())
    if spec.remote_models:
        volumes.append(model_cache_volume(spec))
        mounts.append({"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_DIR})
    if spec.tensor_parallel:  # NCCL's shared-memory transport between the ranks' processes
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": DEV_SHM_SIZE}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HF_HUB_OFFLINE", "value": "0" if needs_hub else "1"},
    ]
    if spec.api_keys_secret:
        env.append({"name": "KUBEINFER_API_KEYS_FILE", "value": f"{API_KEYS_DIR}/{API_KEYS_FILE}"})
    container: dict[str, Any] = {
        "name": "serving",
        "image": spec.runtime.image or config.serving_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": serving_args(config)[:1],
        "args": serving_args(config)[1:],
        "ports": [{"name": "http", "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "env": env,
        **({"envFrom": credential_env_from(spec)} if credential_env_from(spec) else {}),
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(config.startup_timeout_seconds / 10),
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    resources = spec.resources.as_dict()
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + config.drain_seconds + 5,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SERVING_UID,
            "runAsGroup": SERVING_UID,
            "fsGroup": SERVING_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "selector": {"matchLabels": selector_labels(owner.name)},
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": config.startup_timeout_seconds + 300,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {**scrape_annotations(), CONFIG_HASH_ANNOTATION: catalogue_hash},
                },
                "spec": pod_spec,
            },
        },
    }


def render_service(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """ClusterIP Service ``NAME``: port 80 named ``http`` -> the pods' port 8000 of
    :func:`service_selector` (router pods; in service mode serving pods, or the activator pod
    while an isvc scaled to zero has no ready serving pod)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "type": "ClusterIP",
            "selector": service_selector(owner.name, spec),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _behavior(spec: InferenceServiceSpec) -> dict[str, Any]:
    """autoscaling/v2 ``behavior`` shared by both autoscaler modes (see :func:`render_hpa`)."""
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 30},
                {"type": "Pods", "value": 2, "periodSeconds": 30},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": spec.scaling.scale_down_stabilization_seconds,
            "selectPolicy": "Max",
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        },
    }


def render_hpa(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """autoscaling/v2 HPA on the Pods metric ``kubeinfer_queue_length`` (waiting requests per pod).

    Scale-up reacts at once (no stabilisation window; at most +100 % or +2 pods per 30 s,
    whichever is more); scale-down waits ``scaleDownStabilizationSeconds`` and removes at most
    one pod a minute, since a serving pod reloads its models from scratch when it comes back.
    Algorithm: the HPA controller's desired = ceil(current * metric / target) (Kubernetes docs,
    "Horizontal Pod Autoscaling").
    """
    scaling = spec.scaling
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": str(scaling.target_queue_length)},
                    },
                }
            ],
            "behavior": _behavior(spec),
        },
    }


def keda_hpa_name(name: str) -> str:
    """Name of the HPA KEDA creates for ScaledObject ``name`` (KEDA's default ``keda-hpa-NAME``)."""
    return f"keda-hpa-{name}"


def _serving_pods(owner: Owner) -> str:
    """PromQL label matchers of the isvc's serving pods.

    Pods are matched by the ``namespace`` and ``pod`` target labels (what Prometheus's
    kubernetes-pods example job and kube-prometheus-stack PodMonitors attach) and the
    Deployment's pod-name shape ``NAME-<template hash>-<suffix>``, which never matches another
    isvc's pods (``NAME-other`` pods have one dash-separated part more) nor the activator's.
    """
    return f'namespace="{owner.namespace}",pod=~"{owner.name}-[a-z0-9]+-[a-z0-9]+"'


def _router_pods(owner: Owner) -> str:
    """PromQL label matchers of the isvc's router pods (``NAME-router-<hash>-<suffix>``)."""
    return f'namespace="{owner.namespace}",pod=~"{router_name(owner.name)}-[a-z0-9]+-[a-z0-9]+"'


def _activator_pods(owner: Owner) -> str:
    """PromQL label matchers of the isvc's activator pod (``NAME-activator-<hash>-<suffix>``)."""
    return f'namespace="{owner.namespace}",pod=~"{activator_name(owner.name)}-[a-z0-9]+-[a-z0-9]+"'


def queue_query(owner: Owner, spec: InferenceServiceSpec | None = None) -> str:
    """PromQL for the isvc's total queue: ``kubeinfer_queue_length`` summed over its serving pods.

    With ``minReplicas`` 0 the requests waiting at the isvc's front are added: in router mode
    those its router pods hold (``kubeinfer_router_held_requests``), in service mode those
    pending at the activator (``kubeinfer_activator_pending_requests``); each sum defaults to 0
    (``or vector(0)``), so requests sent while the isvc is at zero count as queue and activate it.
    """
    serving = f"sum({QUEUE_METRIC}{{{_serving_pods(owner)}}})"
    if spec is None or spec.scaling.min_replicas > 0:
        return serving
    if spec.router_mode:
        front = f"sum({ROUTER_HELD_METRIC}{{{_router_pods(owner)}}})"
    else:
        front = f"sum({ACTIVATOR_METRIC}{{{_activator_pods(owner)}}})"
    return f"({serving} or vector(0)) + ({front} or vector(0))"


def in_flight_query(owner: Owner) -> str:
    """PromQL that is 1 while any request waits or runs in the isvc's serving pods, else 0:
    ``clamp_max(sum(waiting) + sum(running), 1)``."""
    pods = _serving_pods(owner)
    return (f"clamp_max((sum({QUEUE_METRIC}{{{pods}}}) or vector(0)) + "
            f"(sum({RUNNING_METRIC}{{{pods}}}) or vector(0)), 1)")


def render_scaled_object(owner: Owner, spec: InferenceServiceSpec, config: OperatorConfig) -> dict[str, Any]:
    """KEDA ScaledObject ``NAME`` (keda.sh/v1alpha1) for ``scaling.autoscaler: keda``.

    Trigger ``queue-length``: Prometheus, :func:`queue_query`, ``metricType: AverageValue``,
    ``threshold`` = ``targetQueueLength``: KEDA serves the summed queue as an external metric
    and the HPA it creates computes desired = ceil(sum / target), the same replica count as the
    Pods-metric HPA's ceil(current * average / target). ``activationThreshold`` =
    ``activationQueueLength`` decides 0 -> 1; an empty query result counts as 0
    (``ignoreNullValues``). The HPA behaviour fields are the ones :func:`render_hpa` sets.

    With ``minReplicas`` 0 a second trigger, ``in-flight`` (:func:`in_flight_query`, threshold
    1, activation 0), keeps one replica while any request waits or runs: KEDA scales to zero
    only when no trigger has been active for ``cooldownPeriod`` = ``scaleDownStabilizationSeconds``,
    so a long generation is never cut off by the queue alone reading 0. (KEDA applies
    ``cooldownPeriod`` only to the step to zero; with ``minReplicas`` >= 1 scale-down is the HPA's
    ``behavior`` alone.) ``initialCooldownPeriod`` is the same number of seconds: KEDA's default 0
    would take a new ``minReplicas: 0`` isvc to zero at once, while its first pod still loads
    (kedacore/keda#5008). KEDA docs: "Scaling Deployments", "Prometheus scaler", "ScaledObject
    specification".
    """
    scaling = spec.scaling
    server = scaling.prometheus_address or config.prometheus_url
    triggers: list[dict[str, Any]] = [
        {
            "type": "prometheus",
            "name": "queue-length",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": server,
                "query": queue_query(owner, spec),
                "threshold": str(scaling.target_queue_length),
                "activationThreshold": str(scaling.activation_queue_length),
                "ignoreNullValues": "true",
            },
        }
    ]
    if scaling.min_replicas == 0:
        triggers.append({
            "type": "prometheus",
            "name": "in-flight",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": server,
                "query": in_flight_query(owner),
                "threshold": "1",
                "activationThreshold": "0",
                "ignoreNullValues": "true",
            },
        })
    return {
        "apiVersion": SCALED_OBJECT_API_VERSION,
        "kind": "ScaledObject",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": config.keda_polling_seconds,
            "cooldownPeriod": scaling.scale_down_stabilization_seconds,
            "initialCooldownPeriod": scaling.scale_down_stabilization_seconds,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "name": keda_hpa_name(owner.name),
                    "behavior": _behavior(spec),
                },
            },
            "triggers": triggers,
        },
    }


def render_activator(owner: Owner, spec: InferenceServiceSpec, config: OperatorConfig) -> dict[str, Any]:
    """Deployment ``NAME-activator``: one pod of the operator's image running
    ``kubeinfer_operator.activator`` (503 + ``Retry-After`` for every API request, pending demand
    on ``/metrics``), selected by the isvc's Service while the isvc has no ready serving pod.

    Its pods carry the isvc label and ``app.kubernetes.io/component: activator`` (so the serving
    Deployment's selector never matches them), Prometheus' scrape annotations, no service-account
    token, and the serving pods' node selector and tolerations are not copied (the activator
    needs no accelerator).
    """
    labels = common_labels(owner.name, ACTIVATOR)
    selector = pod_selector(owner.name, ACTIVATOR)
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 3}
    container = {
        "name": "activator",
        "image": config.activator_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["kubeinfer-activator"],
        "args": [f"--isvc={owner.name}", f"--port={SERVING_PORT}",
                 f"--retry-after={config.activator_retry_after_seconds}", f"--window={ACTIVATOR_WINDOW_SECONDS}"],
        "ports": [{"name": "http", "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "readinessProbe": {**probe, "httpGet": {"path": "/ready", "port": "http"}},
        "livenessProbe": {**probe, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": container_security_context(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, activator_name(owner.name), ACTIVATOR),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "revisionHistoryLimit": 2,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": scrape_annotations(),
                },
                "spec": {
                    "containers": [container],
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": OPERATOR_UID,
                        "runAsGroup": OPERATOR_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                },
            },
        },
    }


def wants_activator(spec: InferenceServiceSpec | None, deployment: dict[str, Any] | None) -> bool:
    """Whether isvc's activator should run: ``routing.mode: service``, ``autoscaler: keda`` with
    ``minReplicas`` 0 and the serving Deployment asked to run no pod (KEDA scaled it to zero) or
    with no ready pod. In router mode the router holds requests at zero instead."""
    if spec is None or spec.router_mode or spec.scaling.autoscaler != "keda" or spec.scaling.min_replicas > 0:
        return False
    if deployment is None:
        return False
    wanted = (deployment.get("spec") or {}).get("replicas")
    ready = (deployment.get("status") or {}).get("readyReplicas") or 0
    return wanted == 0 or ready == 0


@dataclass(frozen=True)
class Children:
    """All rendered children, in apply order (catalogue before the pods that mount it).

    Exactly one of ``hpa`` (``scaling.autoscaler: hpa``) and ``scaled_object`` (``keda``) is set;
    ``router`` holds the router-mode objects (:func:`~kubeinfer_operator.render_router.render_router_objects`),
    empty in service mode.
    """

    configmap: dict[str, Any]
    service: dict[str, Any]
    deployment: dict[str, Any]
    hpa: dict[str, Any] | None = None
    scaled_object: dict[str, Any] | None = None
    router: tuple[dict[str, Any], ...] = ()

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """The rendered child of ``kind`` called ``name``, or None."""
        return next((o for o in self.in_order() if o["kind"] == kind and o["metadata"]["name"] == name), None)

    @property
    def autoscaler(self) -> dict[str, Any]:
        """The autoscaler child of the chosen mode (HPA or ScaledObject)."""
        return self.hpa if self.hpa is not None else self.scaled_object  # type: ignore[return-value]

    def in_order(self) -> list[dict[str, Any]]:
        """ConfigMap, Service, Deployment, the router objects (router mode), then the HPA or the
        ScaledObject."""
        return [self.configmap, self.service, self.deployment, *self.router, self.autoscaler]


def render_children(owner: Owner, spec: InferenceServiceSpec, config: OperatorConfig) -> Children:
    """Render every child of ``owner`` from its parsed ``spec``; pure and deterministic."""
    configmap = render_configmap(owner, spec)
    digest = config_hash(configmap["data"][CATALOGUE_FILE])
    keda = spec.scaling.autoscaler == "keda"
    return Children(
        configmap=configmap,
        service=render_service(owner, spec),
        deployment=render_deployment(owner, spec, config, digest),
        hpa=None if keda else render_hpa(owner, spec),
        scaled_object=render_scaled_object(owner, spec, config) if keda else None,
        router=tuple(render_router_objects(owner, spec, config)) if spec.router_mode else (),
    )


def stale_router_objects(owner: Owner, spec: InferenceServiceSpec) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of the router-mode objects an isvc in service mode must not keep
    (after a switch from router mode); empty in router mode."""
    if spec.router_mode:
        return []
    return [(api_version, kind, name_of(owner.name)) for api_version, kind, name_of in ROUTER_KINDS]
