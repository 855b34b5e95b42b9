"""The autoscaler child: an autoscaling/v2 HPA ``NAME`` (``scaling.autoscaler: hpa``) or a KEDA
ScaledObject ``NAME`` (``keda``; KEDA then owns HPA ``keda-hpa-NAME``), and the PromQL the
ScaledObject's triggers read. Pure.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.render_activator import activator_name
from kubeinfer_operator.render_base import Owner, child_metadata
from kubeinfer_operator.render_router import router_name
from kubeinfer_operator.spec import InferenceServiceSpec

#: The queue-length series the serving pod exports (serving/kubeinfer_serving/metrics.py).
QUEUE_METRIC = "kubeinfer_queue_length"
#: Requests running in a serving pod (serving/kubeinfer_serving/metrics.py).
RUNNING_METRIC = "kubeinfer_num_requests_running"
#: Requests held by a router while no serving pod is ready (router/kubeinfer_router/metrics.py).
ROUTER_HELD_METRIC = "kubeinfer_router_held_requests"
#: Requests pending at an activator (kubeinfer_operator/activator.py).
ACTIVATOR_METRIC = "kubeinfer_activator_pending_requests"
SCALED_OBJECT_API_VERSION = "keda.sh/v1alpha1"


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
        "metadata": child_metadata(owner, owner.name),
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
        "metadata": child_metadata(owner, owner.name),
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
