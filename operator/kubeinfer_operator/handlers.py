"""kopf wiring: which events trigger :meth:`Reconciler.reconcile`, and the operator's settings.

* InferenceService create / update (spec, labels or annotations changed) / resume (operator
  start): reconcile that object.
* Any change or deletion of a child (Deployment, Service, ConfigMap, HPA, and the router's
  ServiceAccount, Role and RoleBinding, carrying the label
  ``app.kubernetes.io/managed-by=kubeinfer-operator``): reconcile its controlling owner, so
  drift is reverted, a deleted child is recreated and the status follows the Deployments'
  (serving and router) and HPA's status.
* A serving pod starting, changing readiness or IP, or going away: reconcile its isvc, which
  re-polls the pods' ``/v1/models`` for ``status.models``.
* A resync loop (every ``RESYNC_SECONDS``) that lists the watched InferenceServices and
  reconciles each, as a level-triggered safety net. It is an operator-level task, not a kopf
  timer: kopf timers put a finalizer on every object, and a finalizer makes ``kubectl delete``
  hang whenever the operator is down.

Importing this module registers the handlers on kopf's default registry.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from kubeinfer_operator.config import FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION, OperatorConfig
from kubeinfer_operator.kube import Kube, KubeError, load_api_client
from kubeinfer_operator.metrics import HEALTH, INFERENCESERVICES
from kubeinfer_operator.reconcile import Observed, Outcome, Reconciler
from kubeinfer_operator.render_base import COMPONENT_LABEL, ISVC_LABEL, SERVING

RESYNC_SECONDS = 60.0
#: Retry delay after a transient API failure: RETRY_SECONDS * 2**attempt, at most RETRY_MAX_SECONDS.
RETRY_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
CHILD_SELECTOR = {"app.kubernetes.io/managed-by": FIELD_MANAGER}
#: Serving pods (not the activator or router pods, which carry the isvc label too).
SERVING_POD_SELECTOR = {**CHILD_SELECTOR, ISVC_LABEL: kopf.PRESENT, COMPONENT_LABEL: SERVING}

logger = logging.getLogger(__name__)


def _post_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Queue a Kubernetes Event (core/v1) on ``obj`` through kopf's background poster."""
    kopf.event(dict(obj), type=type_, reason=reason, message=message[:1024])


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """``$KUBECONFIG`` (or ``~/.kube/config``) when present, else in-cluster service-account credentials.

    In a pod the API server is found the way client-go's ``InClusterConfig`` finds it: from
    ``KUBERNETES_SERVICE_HOST``/``_PORT`` (the kubernetes client's ``load_incluster_config``), not
    from the DNS name ``kubernetes.default.svc`` that kopf's minimal service-account login uses,
    so the operator works in clusters without cluster DNS (found on the test cluster's real node).
    """
    if os.environ.get("KUBECONFIG") or os.path.exists(os.path.expanduser("~/.kube/config")):
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_via_client(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's bookkeeping in ``serving.kubeinfer.io/*`` annotations (the structural schema
    would prune ``status.kopf``), skip CRD watching (least-privilege RBAC has no access to
    CRDs; install the CRD before the operator), and build the reconciler."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.scanning.disabled = True
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    memo.reconciler = Reconciler(Kube(load_api_client()), OperatorConfig.from_env(), _post_event)


def retry_delay(attempt: int) -> float:
    """Seconds before retry number ``attempt`` (0-based): exponential, capped, so a broken API
    or missing RBAC produces a trickle of retries, not a storm."""
    return min(RETRY_SECONDS * 2 ** max(attempt, 0), RETRY_MAX_SECONDS)


def _run(
    memo: kopf.Memo, namespace: str, name: str, why: str, retry: int = 0, isvc: Mapping[str, Any] | None = None
) -> Outcome:
    """One reconcile of ``namespace/name`` from the delivered (or indexed) object and the indexed
    children; the API is read only for what no watch holds."""
    reconciler: Reconciler = memo.reconciler
    indices = getattr(memo, "indices", None)
    if isvc is None and indices is not None:
        isvc = next(iter(_values(indices["isvc_index"], (namespace, name))), None)
    if isvc is None:  # not (yet) seen by the watch: ask the API
        isvc = reconciler.kube.get(f"{GROUP}/{VERSION}", KIND, namespace, name)
        if isvc is None:
            return Outcome(found=False)
    try:
        outcome = reconciler.reconcile(namespace, name, isvc=isvc, observed=observed(indices, namespace, name))
    except KubeError as err:
        raise kopf.TemporaryError(f"reconcile of {namespace}/{name} failed: {err}", delay=retry_delay(retry)) from err
    if outcome.found:
        logger.info(
            "reconciled %s/%s (%s): ready=%s created=%s updated=%s invalid=%s status=%s",
            namespace, name, why, outcome.ready, outcome.created, outcome.updated, outcome.invalid,
            outcome.status_changes,
        )
    return outcome


@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """A new InferenceService: create its children and first status."""
    _run(memo, namespace, name, "create", retry, isvc=_plain(body))


@kopf.on.update(GROUP, VERSION, PLURAL)
def on_update(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """The spec (or labels/annotations) changed: re-render and apply."""
    _run(memo, namespace, name, "update", retry, isvc=_plain(body))


@kopf.on.resume(GROUP, VERSION, PLURAL)
def on_resume(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """Operator (re)start: re-apply; identical content changes nothing on the server."""
    _run(memo, namespace, name, "resume", retry, isvc=_plain(body))


def resync_once(memo: kopf.Memo) -> int:
    """Reconcile every InferenceService in the watched namespaces; returns how many were seen.

    ``memo.namespaces`` is the list of watched namespaces, or None for all of them.
    Failures are logged and left to the next round.
    """
    reconciler: Reconciler = memo.reconciler
    seen = 0
    listed = True
    for namespace in getattr(memo, "namespaces", None) or [None]:
        try:
            items = reconciler.kube.list_isvcs(namespace)
        except KubeError as err:
            logger.warning("resync: cannot list InferenceServices in %s: %s", namespace or "all namespaces", err)
            listed = False
            continue
        for item in items:
            meta = item["metadata"]
            seen += 1
            try:
                _run(memo, meta["namespace"], meta["name"], "resync", isvc=item)
            except kopf.TemporaryError as err:
                logger.warning("%s", err)
    if listed:
        INFERENCESERVICES.set(seen)
    return seen


async def _resync_loop(memo: kopf.Memo) -> None:
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        await asyncio.to_thread(resync_once, memo)


@kopf.on.startup()
async def start_resync(memo: kopf.Memo, **kwargs: Any) -> None:
    """Keep the indexes for :func:`resync_once` and child events, and start the periodic
    resync task (after :func:`configure` built the reconciler)."""
    memo.indices = {key: kwargs[key] for key in INDEXES}
    memo.resync_task = asyncio.create_task(_resync_loop(memo))
    HEALTH.mark_started()


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    """Stop the resync task on operator exit."""
    task = getattr(memo, "resync_task", None)
    if task is not None:
        task.cancel()


def owner_name(body: Mapping[str, Any]) -> str | None:
    """Name of the InferenceService that controls ``body`` (a child), or None.

    The HPA KEDA creates for an isvc's ScaledObject is controlled by the ScaledObject; it
    carries the ScaledObject's labels, so its isvc is the ``serving.kubeinfer.io/inferenceservice``
    label's value.
    """
    meta = body.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if not ref.get("controller"):
            continue
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return ref.get("name")
        if ref.get("kind") == "ScaledObject" and str(ref.get("apiVersion", "")).startswith("keda.sh/"):
            return (meta.get("labels") or {}).get(ISVC_LABEL)
    return None


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A detached plain-dict copy of a kopf body (kopf reuses and updates its body objects)."""
    return copy.deepcopy(dict(body))


def _child(kind: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """Index entry of a child: ``{(namespace, owning isvc): object}`` (kind filled in), or None."""
    owner = owner_name(body)
    namespace = (body.get("metadata") or {}).get("namespace")
    if not owner or not namespace:
        return None
    obj = _plain(body)
    obj["kind"] = kind
    return {(namespace, owner): obj}


@kopf.index(GROUP, VERSION, PLURAL)
def isvc_index(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every watched InferenceService by (namespace, name): reconciles read it from here."""
    return {(namespace, name): _plain(body)}


@kopf.index("", "v1", "configmaps", labels=CHILD_SELECTOR)
def children_configmaps(body: kopf.Body, **_: Any) -> dict | None:
    """Catalogue ConfigMaps by (namespace, isvc)."""
    return _child("ConfigMap", body)


@kopf.index("", "v1", "services", labels=CHILD_SELECTOR)
def children_services(body: kopf.Body, **_: Any) -> dict | None:
    """Services by (namespace, isvc)."""
    return _child("Service", body)


@kopf.index("apps", "v1", "deployments", labels=CHILD_SELECTOR)
def children_deployments(body: kopf.Body, **_: Any) -> dict | None:
    """Deployments (with their status) by (namespace, isvc)."""
    return _child("Deployment", body)


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD_SELECTOR)
def children_hpas(body: kopf.Body, **_: Any) -> dict | None:
    """HPAs (the operator's, and KEDA's for a ScaledObject child) by (namespace, isvc)."""
    return _child("HorizontalPodAutoscaler", body)


@kopf.index("", "v1", "serviceaccounts", labels=CHILD_SELECTOR)
def children_serviceaccounts(body: kopf.Body, **_: Any) -> dict | None:
    """Router ServiceAccounts by (namespace, isvc)."""
    return _child("ServiceAccount", body)


@kopf.index("rbac.authorization.k8s.io", "v1", "roles", labels=CHILD_SELECTOR)
def children_roles(body: kopf.Body, **_: Any) -> dict | None:
    """Router Roles by (namespace, isvc)."""
    return _child("Role", body)


@kopf.index("rbac.authorization.k8s.io", "v1", "rolebindings", labels=CHILD_SELECTOR)
def children_rolebindings(body: kopf.Body, **_: Any) -> dict | None:
    """Router RoleBindings by (namespace, isvc)."""
    return _child("RoleBinding", body)


@kopf.index("", "v1", "pods", labels=SERVING_POD_SELECTOR)
def serving_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict | None:
    """Serving pods by (namespace, isvc), for the /v1/models poll."""
    return {(namespace, labels[ISVC_LABEL]): _plain(body)}


#: The child indexes :func:`observed` reads (each maps (namespace, isvc) -> child objects).
CHILD_INDEXES = ("children_configmaps", "children_services", "children_deployments", "children_hpas",
                 "children_serviceaccounts", "children_roles", "children_rolebindings")
INDEXES = ("isvc_index", *CHILD_INDEXES, "serving_pods")


def _values(index: Mapping[Any, Any], key: Any) -> list[Any]:
    """The values an index holds for ``key``. kopf updates indexes on the event loop while
    reconciles read them from worker threads: retry a read that raced with an update."""
    for _ in range(5):
        try:
            return list(index.get(key, []))
        except RuntimeError:  # changed size during iteration
            continue
    return list(index.get(key, []))


def observed(indices: Mapping[str, Any] | None, namespace: str, name: str) -> Observed:
    """The indexed children and pods of isvc ``namespace/name`` (nothing before the indexes exist,
    which kopf builds before any handler runs)."""
    if indices is None:
        return Observed()
    children: dict[tuple[str, str], dict[str, Any]] = {}
    for key in CHILD_INDEXES:
        for obj in _values(indices[key], (namespace, name)):
            children[(obj["kind"], obj["metadata"]["name"])] = obj
    return Observed(children=children, pods=_values(indices["serving_pods"], (namespace, name)))


def _on_child_event(type: str | None, body: Mapping[str, Any], memo: kopf.Memo) -> None:
    if type is None:  # the initial listing: on_resume covers existing owners
        return
    owner = owner_name(body)
    namespace = (body.get("metadata") or {}).get("namespace")
    if not owner or not namespace:
        return
    child = f"{body.get('kind')}/{(body.get('metadata') or {}).get('name')}"
    if type == "DELETED":
        memo.reconciler.forget(namespace, str(body.get("kind")), str((body.get("metadata") or {}).get("name")))
    try:
        _run(memo, namespace, owner, f"{child} {type.lower()}")
    except kopf.TemporaryError as err:  # the resync timer retries
        logger.warning("%s", err)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_SELECTOR)
def on_deployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Deployment child changed (status included) or was deleted."""
    _on_child_event(type, body, memo)


@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD_SELECTOR)
def on_hpa_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """An HPA child (the operator's, or the one KEDA made for a ScaledObject child) changed
    (status included) or was deleted."""
    _on_child_event(type, body, memo)


@kopf.on.event("", "v1", "services", labels=CHILD_SELECTOR)
def on_service_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Service child changed or was deleted."""
    _on_child_event(type, body, memo)


@kopf.on.event("", "v1", "configmaps", labels=CHILD_SELECTOR)
def on_configmap_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A catalogue ConfigMap changed or was deleted."""
    _on_child_event(type, body, memo)


@kopf.on.event("", "v1", "serviceaccounts", labels=CHILD_SELECTOR)
def on_serviceaccount_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A router ServiceAccount changed or was deleted."""
    _on_child_event(type, body, memo)


@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=CHILD_SELECTOR)
def on_role_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A router Role changed or was deleted."""
    _on_child_event(type, body, memo)


@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=CHILD_SELECTOR)
def on_rolebinding_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A router RoleBinding changed or was deleted."""
    _on_child_event(type, body, memo)


def pod_signature(body: Mapping[str, Any]) -> tuple[str, bool, str]:
    """What about a serving pod matters to its isvc's status: (phase, Ready, pod IP)."""
    status = body.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return str(status.get("phase", "")), ready, str(status.get("podIP", ""))


@kopf.on.event("", "v1", "pods", labels=SERVING_POD_SELECTOR)
def on_pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A serving pod started, became (un)ready, got its IP or went away: re-read its models
    (status.models, ModelsReady). Other pod updates (e.g. container restarts counted, probes
    unchanged) are ignored, so a busy pod does not cause a reconcile storm."""
    meta = body.get("metadata") or {}
    owner, namespace, uid = (meta.get("labels") or {}).get(ISVC_LABEL), meta.get("namespace"), meta.get("uid")
    if type is None or not owner or not namespace:
        return
    seen: dict[str, tuple[str, bool, str]] = memo.setdefault("pod_signatures", {})
    signature = pod_signature(body)
    if type == "DELETED":
        seen.pop(uid, None)
    elif seen.get(uid) == signature:
        return
    else:
        seen[uid] = signature
    try:
        _run(memo, namespace, owner, f"Pod/{meta.get('name')} {type.lower()}")
    except kopf.TemporaryError as err:  # the resync loop retries
        logger.warning("%s", err)
