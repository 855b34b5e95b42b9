"""Pure renderers of the fleet router's objects (``spec.routing.mode: router``, issue 18).

In router mode an isvc ``NAME`` gets, besides its serving Deployment:

* Service ``NAME-pods``: headless (``clusterIP: None``), selecting the serving pods only, ready
  ones only (``publishNotReadyAddresses: false``). Its EndpointSlices are the router's endpoint
  source (``kubeinfer-router --kube-service NAME-pods``); nothing else uses it.
* ServiceAccount, Role and RoleBinding ``NAME-router``: get/list/watch of
  ``discovery.k8s.io`` EndpointSlices in the isvc's namespace, nothing else.
* Deployment ``NAME-router``: ``routing.replicas`` pods of the operator's image running
  ``kubeinfer-router``, labelled ``app.kubernetes.io/component: router``; the isvc's Service
  ``NAME`` selects them (:func:`kubeinfer_operator.render_service.render_service`).

No I/O here; the reconciler applies these with server-side apply.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.config import OPERATOR_UID, OperatorConfig
from kubeinfer_operator.render_base import (
    PRESTOP_SECONDS,
    ROUTER,
    SERVING_PORT,
    Owner,
    child_metadata,
    common_labels,
    container_security_context,
    operator_pull_secrets,
    pod_selector,
    scrape_annotations,
    selector_labels,
)
from kubeinfer_operator.spec import InferenceServiceSpec

#: Router container resources when ``routing.resources`` is empty: the router is an asyncio proxy
#: (no model, no batching); memory covers held request bodies (``maxHeldRequests`` x body size)
#: in the usual case, not the worst one.
ROUTER_RESOURCES: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
#: Seconds a terminating router pod gives the requests in flight through it (streams included) after
#: the preStop pause (``kubeinfer-router --timeout-graceful-shutdown``); the kubelet's SIGKILL
#: comes 5 s after that.
ROUTER_DRAIN_SECONDS = 60
RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"


def router_name(name: str) -> str:
    """Name of the router Deployment, ServiceAccount, Role and RoleBinding of isvc ``name``
    (router pods: ``NAME-router-<hash>-<suffix>``)."""
    return f"{name}-router"


def pods_service_name(name: str) -> str:
    """Name of the headless Service over isvc ``name``'s serving pods (the router's endpoint source)."""
    return f"{name}-pods"


def router_selector(name: str) -> dict[str, str]:
    """Pod selector of the router Deployment, and of the isvc's Service in router mode."""
    return pod_selector(name, ROUTER)


def router_args(owner: Owner, spec: InferenceServiceSpec) -> list[str]:
    """``kubeinfer-router`` command line (flags of router/kubeinfer_router/config.py) from
    ``spec.routing``; ``$(POD_NAMESPACE)`` is expanded by the kubelet from the container's env."""
    r = spec.routing
    return [
        "kubeinfer-router",
        "--host", "0.0.0.0",
        "--port", str(SERVING_PORT),
        "--kube-service", pods_service_name(owner.name),
        "--kube-namespace", "$(POD_NAMESPACE)",
        "--isvc", owner.name,
        "--load-factor", str(r.load_factor),
        "--virtual-nodes", str(r.virtual_nodes),
        "--prefix-chars", str(r.prefix_chars),
        "--imbalance-min-requests", str(r.imbalance_min_requests),
        "--imbalance-ratio", str(r.imbalance_ratio),
        "--hold-timeout-seconds", str(r.hold_timeout_seconds),
        "--max-held-requests", str(r.max_held_requests),
        "--timeout-graceful-shutdown", str(ROUTER_DRAIN_SECONDS),
    ]


def router_resources(spec: InferenceServiceSpec) -> dict[str, Any]:
    """``routing.resources`` as a ResourceRequirements object, else :data:`ROUTER_RESOURCES`."""
    return spec.routing.resources.as_dict() or {k: dict(v) for k, v in ROUTER_RESOURCES.items()}


def render_pods_service(owner: Owner) -> dict[str, Any]:
    """Headless Service ``NAME-pods`` over the serving pods (port ``http`` 8000), ready pods only."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, pods_service_name(owner.name)),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(owner.name),
            "publishNotReadyAddresses": False,
            "ports": [{"name": "http", "port": SERVING_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_router_service_account(owner: Owner) -> dict[str, Any]:
    """ServiceAccount ``NAME-router``, the identity of the router pods."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": child_metadata(owner, router_name(owner.name), ROUTER),
        "automountServiceAccountToken": False,  # the router pod opts in; nothing else using it gets a token
    }


def render_router_role(owner: Owner) -> dict[str, Any]:
    """Role ``NAME-router``: get/list/watch EndpointSlices in the isvc's namespace, nothing else
    (a Role cannot restrict a list/watch to one label, so the router can read every EndpointSlice
    of its namespace: addresses and ports, no Secrets, nothing it can change)."""
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "Role",
        "metadata": child_metadata(owner, router_name(owner.name), ROUTER),
        "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                   "verbs": ["get", "list", "watch"]}],
    }


def render_router_role_binding(owner: Owner) -> dict[str, Any]:
    """RoleBinding ``NAME-router``: the Role to the ServiceAccount of the same name."""
    name = router_name(owner.name)
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "RoleBinding",
        "metadata": child_metadata(owner, name, ROUTER),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }


def render_router_deployment(owner: Owner, spec: InferenceServiceSpec, config: OperatorConfig) -> dict[str, Any]:
    """Deployment ``NAME-router``: ``routing.replicas`` pods of ``config.router_image`` running
    :func:`router_args`.

    The pods carry ``app.kubernetes.io/component: router`` (neither the serving Deployment's nor
    the headless Service's selector matches them), Prometheus' scrape annotations (KEDA's
    activation reads their ``kubeinfer_router_held_requests``), the ServiceAccount token (to
    watch EndpointSlices), ``POD_NAMESPACE`` from the downward API, probes on ``/health``
    (liveness) and ``/ready`` (readiness: discovery has synced), a preStop pause so kube-proxy
    stops sending before the router drains, and a spread over nodes when the scheduler can.
    The serving pods' node selector and tolerations are not copied (no accelerator needed).
    """
    name = router_name(owner.name)
    labels = common_labels(owner.name, ROUTER)
    args = router_args(owner, spec)
    probe = {"periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3}
    container: dict[str, Any] = {
        "name": "router",
        "image": config.router_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": args[:1],
        "args": args[1:],
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [{"name": "http", "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, **probe},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, **probe, "periodSeconds": 10},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "resources": router_resources(spec),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": container_security_context(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(owner, name, ROUTER),
        "spec": {
            "replicas": spec.routing.replicas,
            "selector": {"matchLabels": router_selector(owner.name)},
            "revisionHistoryLimit": 3,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": scrape_annotations()},
                "spec": {
                    "serviceAccountName": name,
                    **operator_pull_secrets(config),
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                    "terminationGracePeriodSeconds": PRESTOP_SECONDS + ROUTER_DRAIN_SECONDS + 5,
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": router_selector(owner.name)},
                    }],
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


def render_router_objects(owner: Owner, spec: InferenceServiceSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """Every router-mode object, in apply order: the headless Service, the ServiceAccount, Role,
    RoleBinding (the pods' permissions exist before they start), then the router Deployment."""
    return [
        render_pods_service(owner),
        render_router_service_account(owner),
        render_router_role(owner),
        render_router_role_binding(owner),
        render_router_deployment(owner, spec, config),
    ]


#: (apiVersion, kind, name function) of every router-mode object: what the reconciler deletes
#: when an isvc leaves router mode.
ROUTER_KINDS: tuple[tuple[str, str, Any], ...] = (
    ("apps/v1", "Deployment", router_name),
    ("v1", "Service", pods_service_name),
    (RBAC_API_VERSION, "RoleBinding", router_name),
    (RBAC_API_VERSION, "Role", router_name),
    ("v1", "ServiceAccount", router_name),
)
