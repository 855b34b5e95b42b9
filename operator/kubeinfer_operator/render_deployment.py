"""The serving Deployment ``NAME``: the ``kubeinfer-serve`` container, its volumes, probes and the pod knobs.

Pure (spec in, dict out). ``replicas`` is set only with ``scaling.autoscaler: none``; otherwise the
autoscaler owns it.
"""

from __future__ import annotations

import math
from typing import Any

from kubeinfer_operator.config import SERVING_UID, OperatorConfig
from kubeinfer_operator.render_base import (
    PRESTOP_SECONDS,
    SERVING_PORT,
    Owner,
    child_metadata,
    common_labels,
    container_security_context,
    scrape_annotations,
    selector_labels,
)
from kubeinfer_operator.render_catalogue import (
    CACHE_DIR,
    CATALOGUE_DIR,
    CATALOGUE_FILE,
    CONFIG_HASH_ANNOTATION,
    MODEL_CACHE_DIR,
    configmap_name,
    secret_env_prefix,
)
from kubeinfer_operator.spec import MODEL_STORE_ROOT, SHM_PATH, InferenceServiceSpec

#: Where the Secret named by ``spec.apiKeysSecret`` is mounted, and its key read by the serving pod.
API_KEYS_DIR = "/etc/kubeinfer-keys"
API_KEYS_FILE = "keys.yaml"
MODEL_CACHE_VOLUME = "model-cache"
#: The ``/dev/shm`` volume of ``spec.shmSize``.
SHM_VOLUME = "dshm"
#: ``/dev/shm`` size of pods with a tensor-parallel model when ``shmSize`` is not given (NCCL's
#: shared-memory transport between the ranks' processes; a container's default is 64 MiB). It
#: counts against the container's memory.
TP_SHM_SIZE = "1Gi"


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


def merge_env(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The container's ``env``: the operator's variables, each replaced in place by a ``spec.env``
    entry of the same name, then the other ``spec.env`` entries in their order (one entry per
    name, as server-side apply's list map keyed by ``name`` requires)."""
    by_name = {e["name"]: e for e in theirs}
    out = [dict(by_name.pop(e["name"], e)) for e in ours]
    return out + [dict(e) for e in theirs if e["name"] in by_name]


def pull_secrets(spec: InferenceServiceSpec, config: OperatorConfig) -> list[dict[str, str]]:
    """``imagePullSecrets`` of the serving pod: the operator's defaults (the chart's
    ``imagePullSecrets``, env ``KUBEINFER_IMAGE_PULL_SECRETS``) then ``spec.imagePullSecrets``,
    each name once."""
    names = list(dict.fromkeys([*config.image_pull_secrets, *(s["name"] for s in spec.image_pull_secrets)]))
    return [{"name": n} for n in names]


def pod_knobs(spec: InferenceServiceSpec, config: OperatorConfig) -> dict[str, Any]:
    """The PodSpec fields ``spec`` passes through (scheduling, service account, runtime and
    priority classes, pull secrets), only those set."""
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        out["affinity"] = dict(spec.affinity)
    if spec.service_account_name:
        out["serviceAccountName"] = spec.service_account_name
    if spec.runtime_class_name:
        out["runtimeClassName"] = spec.runtime_class_name
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    secrets = pull_secrets(spec, config)
    if secrets:
        out["imagePullSecrets"] = secrets
    return out


def render_deployment(
    owner: Owner, spec: InferenceServiceSpec, config: OperatorConfig, catalogue_hash: str
) -> dict[str, Any]:
    """The serving Deployment ``NAME``; ``replicas`` is :attr:`~InferenceServiceSpec.fixed_replicas`
    with ``scaling.autoscaler: none`` and left out otherwise (the autoscaler owns it).

    ``spec`` adds to the pod: ``env`` (replacing the operator's variables of the same name),
    ``envFrom`` (after the credential Secrets), ``podLabels`` and ``podAnnotations`` (the
    operator's own labels and annotations win: they carry the selector, the catalogue hash and the
    scrape settings), ``volumes``/``volumeMounts``, a memory-backed ``emptyDir`` at ``/dev/shm``
    of ``shmSize`` (the engine's and PyTorch's shared memory; the container runtime's default is
    64 MiB), and :func:`pod_knobs`.

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
    shm = spec.shm_size if spec.shm_size is not None else (TP_SHM_SIZE if spec.tensor_parallel else None)
    if shm is not None:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": str(shm)}})
        mounts.append({"name": SHM_VOLUME, "mountPath": SHM_PATH})
    volumes.extend(dict(v) for v in spec.volumes)
    mounts.extend(dict(m) for m in spec.volume_mounts)
    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HF_HUB_OFFLINE", "value": "0" if needs_hub else "1"},
    ]
    if spec.api_keys_secret:
        env.append({"name": "KUBEINFER_API_KEYS_FILE", "value": f"{API_KEYS_DIR}/{API_KEYS_FILE}"})
    env_from = [*credential_env_from(spec), *(dict(e) for e in spec.env_from)]
    container: dict[str, Any] = {
        "name": "serving",
        "image": spec.runtime.image or config.serving_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": serving_args(config)[:1],
        "args": serving_args(config)[1:],
        "ports": [{"name": "http", "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "env": merge_env(env, spec.env),
        **({"envFrom": env_from} if env_from else {}),
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
    pod_spec.update(pod_knobs(spec, config))
    deployment_spec: dict[str, Any] = {}
    if spec.fixed_replicas is not None:
        deployment_spec["replicas"] = spec.fixed_replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(owner, owner.name),
        "spec": {
            **deployment_spec,
            "selector": {"matchLabels": selector_labels(owner.name)},
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": config.startup_timeout_seconds + 300,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": {**spec.pod_labels, **labels},
                    "annotations": {**spec.pod_annotations, **scrape_annotations(),
                                    CONFIG_HASH_ANNOTATION: catalogue_hash},
                },
                "spec": pod_spec,
            },
        },
    }
