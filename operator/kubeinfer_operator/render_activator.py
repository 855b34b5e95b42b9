"""The activator Deployment ``NAME-activator`` of an isvc scaled to zero in service mode. Pure."""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.config import OPERATOR_UID, OperatorConfig
from kubeinfer_operator.render_base import (
    ACTIVATOR,
    SERVING_PORT,
    Owner,
    child_metadata,
    common_labels,
    container_security_context,
    operator_pull_secrets,
    pod_selector,
    scrape_annotations,
)
from kubeinfer_operator.spec import InferenceServiceSpec

#: Seconds a refused request counts as pending at the activator (a few Prometheus scrape and
#: KEDA polling intervals).
ACTIVATOR_WINDOW_SECONDS = 60


def activator_name(name: str) -> str:
    """Name of the activator Deployment of isvc ``name`` (its pods: ``NAME-activator-<hash>-<suffix>``)."""
    return f"{name}-activator"


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
        "metadata": child_metadata(owner, activator_name(owner.name), ACTIVATOR),
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
                    **operator_pull_secrets(config),
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
