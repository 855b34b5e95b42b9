"""Every child of an InferenceService, rendered: the composition of the per-kind renderers.

No I/O here; the reconciler applies what :func:`render_children` returns with server-side apply,
so every field set is owned by the operator's field manager and anything not set (the
Deployment's ``replicas`` under an autoscaler; server defaults) is left to others. One module per
child kind, each pure:

* :mod:`~kubeinfer_operator.render_base`: owner, names, labels, metadata, pod security;
* :mod:`~kubeinfer_operator.render_catalogue`: ConfigMap ``NAME-models`` (the catalogue);
* :mod:`~kubeinfer_operator.render_deployment`: the serving Deployment ``NAME`` and its pod knobs;
* :mod:`~kubeinfer_operator.render_service`: Service ``NAME`` (port 80 -> 8000);
* :mod:`~kubeinfer_operator.render_autoscaling`: HPA or KEDA ScaledObject ``NAME`` and its PromQL;
* :mod:`~kubeinfer_operator.render_activator`: the activator of an isvc at zero (service mode);
* :mod:`~kubeinfer_operator.render_router`: the fleet router's objects (router mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.render_autoscaling import render_hpa, render_scaled_object
from kubeinfer_operator.render_base import Owner
from kubeinfer_operator.render_catalogue import CATALOGUE_FILE, config_hash, render_configmap
from kubeinfer_operator.render_deployment import render_deployment
from kubeinfer_operator.render_router import ROUTER_KINDS, render_router_objects
from kubeinfer_operator.render_service import render_service
from kubeinfer_operator.spec import InferenceServiceSpec


@dataclass(frozen=True)
class Children:
    """All rendered children, in apply order (catalogue before the pods that mount it).

    At most one of ``hpa`` (``scaling.autoscaler: hpa``) and ``scaled_object`` (``keda``) is set
    (neither with ``none``: the Deployment's replicas are ``spec.replicas``);
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
    def autoscaler(self) -> dict[str, Any] | None:
        """The autoscaler child of the chosen mode (HPA or ScaledObject), None with ``none``."""
        return self.hpa if self.hpa is not None else self.scaled_object

    def in_order(self) -> list[dict[str, Any]]:
        """ConfigMap, Service, Deployment, the router objects (router mode), then the HPA or the
        ScaledObject (if any)."""
        tail = [self.autoscaler] if self.autoscaler is not None else []
        return [self.configmap, self.service, self.deployment, *self.router, *tail]


def render_children(owner: Owner, spec: InferenceServiceSpec, config: OperatorConfig) -> Children:
    """Render every child of ``owner`` from its parsed ``spec``; pure and deterministic."""
    configmap = render_configmap(owner, spec)
    digest = config_hash(configmap["data"][CATALOGUE_FILE])
    keda = spec.scaling.autoscaler == "keda"
    hpa = spec.scaling.autoscaler == "hpa"
    return Children(
        configmap=configmap,
        service=render_service(owner, spec),
        deployment=render_deployment(owner, spec, config, digest),
        hpa=render_hpa(owner, spec) if hpa else None,
        scaled_object=render_scaled_object(owner, spec, config) if keda else None,
        router=tuple(render_router_objects(owner, spec, config)) if spec.router_mode else (),
    )


def stale_router_objects(owner: Owner, spec: InferenceServiceSpec) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of the router-mode objects an isvc in service mode must not keep
    (after a switch from router mode); empty in router mode."""
    if spec.router_mode:
        return []
    return [(api_version, kind, name_of(owner.name)) for api_version, kind, name_of in ROUTER_KINDS]
