"""What every rendered child shares: the owner, names of ports and labels, metadata, pod security.

Pure helpers for :mod:`kubeinfer_operator.render` (serving pods, Services, autoscalers) and
:mod:`kubeinfer_operator.render_router` (the fleet router's objects); no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.config import FIELD_MANAGER, GROUP, KIND, VERSION, OperatorConfig

#: Container port (named ``http``) of serving, activator and router pods.
SERVING_PORT = 8000
#: Port of the isvc's Service ``NAME``.
SERVICE_PORT = 80
ISVC_LABEL = f"{GROUP}/inferenceservice"
COMPONENT_LABEL = "app.kubernetes.io/component"
#: ``app.kubernetes.io/component`` values: each kind of pod an isvc runs has its own, so no
#: selector of one matches the pods of another.
SERVING, ROUTER, ACTIVATOR = "serving", "router", "activator"
#: Seconds a terminating pod keeps serving before SIGTERM, so endpoint removal reaches every
#: kube-proxy / load balancer / router first (the usual preStop pause, Kubernetes "Pod Lifecycle" docs).
PRESTOP_SECONDS = 10


@dataclass(frozen=True)
class Owner:
    """The InferenceService the children belong to (``metadata.name``, ``namespace``, ``uid``)."""

    name: str
    namespace: str
    uid: str


def pod_selector(name: str, component: str) -> dict[str, str]:
    """Labels selecting isvc ``name``'s pods of one ``component`` (:data:`SERVING`, :data:`ROUTER`,
    :data:`ACTIVATOR`)."""
    return {ISVC_LABEL: name, COMPONENT_LABEL: component}


def selector_labels(name: str) -> dict[str, str]:
    """Pod selector of the serving Deployment (immutable once the Deployment exists)."""
    return pod_selector(name, SERVING)


def common_labels(name: str, component: str = SERVING) -> dict[str, str]:
    """Labels every child carries (Kubernetes recommended labels plus the owning isvc's name);
    ``component`` says which part of the isvc the child belongs to."""
    return {
        "app.kubernetes.io/name": "kubeinfer-serving",
        "app.kubernetes.io/instance": name,
        COMPONENT_LABEL: component,
        "app.kubernetes.io/part-of": "kubeinfer",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        ISVC_LABEL: name,
    }


def scrape_annotations() -> dict[str, str]:
    """Prometheus' ``prometheus.io/*`` pod annotations for ``/metrics`` on port 8000: what the
    shipped kubernetes-pods scrape job (deploy/prometheus/) discovers serving, router and activator
    pods by."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(SERVING_PORT), "prometheus.io/path": "/metrics"}


def container_security_context() -> dict[str, Any]:
    """The restricted container securityContext of every pod the operator renders (Pod Security
    Standards "restricted": no privilege escalation, non-root, all capabilities dropped) plus a
    read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def child_metadata(owner: Owner, name: str, component: str = SERVING) -> dict[str, Any]:
    """``metadata`` of a child called ``name``: namespace, :func:`common_labels`, and the isvc as
    its controlling owner (garbage collection deletes the child with the isvc)."""
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": common_labels(owner.name, component),
        "ownerReferences": [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
            }
        ],
    }


def operator_pull_secrets(config: OperatorConfig) -> dict[str, Any]:
    """``{"imagePullSecrets": [...]}`` of the operator's default pull secrets for pods of the
    operator's image (router, activator); empty when there are none."""
    if not config.image_pull_secrets:
        return {}
    return {"imagePullSecrets": [{"name": n} for n in config.image_pull_secrets]}
