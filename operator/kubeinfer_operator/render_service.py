"""The isvc's Service ``NAME`` (port 80 -> the pods' ``http``) and the in-cluster URL clients use. Pure."""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.render_base import ISVC_LABEL, SERVICE_PORT, Owner, child_metadata
from kubeinfer_operator.render_router import router_selector
from kubeinfer_operator.spec import InferenceServiceSpec


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


def render_service(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """ClusterIP Service ``NAME``: port 80 named ``http`` -> the pods' port 8000 of
    :func:`service_selector` (router pods; in service mode serving pods, or the activator pod
    while an isvc scaled to zero has no ready serving pod)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, owner.name),
        "spec": {
            "type": "ClusterIP",
            "selector": service_selector(owner.name, spec),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
