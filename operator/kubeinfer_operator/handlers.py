"""kopf wiring: which events trigger :meth:`Reconciler.reconcile`, and the operator's settings.

* InferenceService create / update (spec, labels or annotations changed) / resume (operator
  start): reconcile that object.
* Any change or deletion of a child (Deployment, Service, ConfigMap, HPA carrying the label
  ``app.kubernetes.io/managed-by=kubeinfer-operator``): reconcile its controlling owner, so
  drift is reverted, a deleted child is recreated and the status follows the Deployment's
  and HPA's status.
* A resync loop (every ``RESYNC_SECONDS``) that lists the watched InferenceServices and
  reconciles each, as a level-triggered safety net. It is an operator-level task, not a kopf
  timer: kopf timers put a finalizer on every object, and a finalizer makes ``kubectl delete``
  hang whenever the operator is down.

Importing this module registers the handlers on kopf's default registry.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from kubeinfer_operator.config import FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION, OperatorConfig
from kubeinfer_operator.kube import Kube, KubeError, load_api_client
from kubeinfer_operator.reconcile import Outcome, Reconciler

RESYNC_SECONDS = 60.0
#: Retry delay after a transient API failure: RETRY_SECONDS * 2**attempt, at most RETRY_MAX_SECONDS.
RETRY_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
CHILD_SELECTOR = {"app.kubernetes.io/managed-by": FIELD_MANAGER}

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


def _run(memo: kopf.Memo, namespace: str, name: str, why: str, retry: int = 0) -> Outcome:
    reconciler: Reconciler = memo.reconciler
    try:
        outcome = reconciler.reconcile(namespace, name)
    except KubeError as err:
        raise kopf.TemporaryError(f"reconcile of {namespace}/{name} failed: {err}", delay=retry_delay(retry)) from err
    if outcome.found:
        logger.info(
            "reconciled %s/%s (%s): ready=%s created=%s updated=%s invalid=%s",
            namespace, name, why, outcome.ready, outcome.created, outcome.updated, outcome.invalid,
        )
    return outcome


@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(namespace: str, name: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """A new InferenceService: create its children and first status."""
    _run(memo, namespace, name, "create", retry)


@kopf.on.update(GROUP, VERSION, PLURAL)
def on_update(namespace: str, name: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """The spec (or labels/annotations) changed: re-render and apply."""
    _run(memo, namespace, name, "update", retry)


@kopf.on.resume(GROUP, VERSION, PLURAL)
def on_resume(namespace: str, name: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """Operator (re)start: re-apply; identical content changes nothing on the server."""
    _run(memo, namespace, name, "resume", retry)


def resync_once(memo: kopf.Memo) -> int:
    """Reconcile every InferenceService in the watched namespaces; returns how many were seen.

    ``memo.namespaces`` is the list of watched namespaces, or None for all of them.
    Failures are logged and left to the next round.
    """
    reconciler: Reconciler = memo.reconciler
    seen = 0
    for namespace in getattr(memo, "namespaces", None) or [None]:
        try:
            items = reconciler.kube.list_isvcs(namespace)
        except KubeError as err:
            logger.warning("resync: cannot list InferenceServices in %s: %s", namespace or "all namespaces", err)
            continue
        for item in items:
            meta = item["metadata"]
            seen += 1
            try:
                _run(memo, meta["namespace"], meta["name"], "resync")
            except kopf.TemporaryError as err:
                logger.warning("%s", err)
    return seen


async def _resync_loop(memo: kopf.Memo) -> None:
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        await asyncio.to_thread(resync_once, memo)


@kopf.on.startup()
async def start_resync(memo: kopf.Memo, **_: Any) -> None:
    """Start the periodic resync task (after :func:`configure` built the reconciler)."""
    memo.resync_task = asyncio.create_task(_resync_loop(memo))


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    """Stop the resync task on operator exit."""
    task = getattr(memo, "resync_task", None)
    if task is not None:
        task.cancel()


def owner_name(body: Mapping[str, Any]) -> str | None:
    """Name of the InferenceService that controls ``body`` (a child), or None."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return ref.get("name")
    return None


def _on_child_event(type: str | None, body: Mapping[str, Any], memo: kopf.Memo) -> None:
    if type is None:  # the initial listing: on_resume covers existing owners
        return
    owner = owner_name(body)
    namespace = (body.get("metadata") or {}).get("namespace")
    if not owner or not namespace:
        return
    child = f"{body.get('kind')}/{(body.get('metadata') or {}).get('name')}"
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
    """An HPA child changed (status included) or was deleted."""
    _on_child_event(type, body, memo)


@kopf.on.event("", "v1", "services", labels=CHILD_SELECTOR)
def on_service_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Service child changed or was deleted."""
    _on_child_event(type, body, memo)


@kopf.on.event("", "v1", "configmaps", labels=CHILD_SELECTOR)
def on_configmap_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A catalogue ConfigMap changed or was deleted."""
    _on_child_event(type, body, memo)
