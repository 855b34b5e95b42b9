"""One reconcile of one InferenceService: read it, render its children, apply them, write status.

Level-triggered: every call re-derives everything from the isvc and its children as stored now,
so a call caused by the isvc, by a child's change or deletion, or by a periodic resync does the
same thing, and repeating it changes nothing (server-side apply of identical content is a
no-op on the server: no new resourceVersion, no rollout).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeinfer_operator.config import GROUP, KIND, VERSION, OperatorConfig
from kubeinfer_operator.kube import Kube, KubeError
from kubeinfer_operator.models_poll import ModelPoller, summarise
from kubeinfer_operator.render import (
    SCALED_OBJECT_API_VERSION,
    Owner,
    keda_hpa_name,
    render_children,
    selector_labels,
)
from kubeinfer_operator.spec import InvalidSpecError, parse_spec
from kubeinfer_operator.status import INVALID_SPEC, READY, compute_status, status_changed

ISVC_API_VERSION = f"{GROUP}/{VERSION}"
HPA_API_VERSION = "autoscaling/v2"
#: Seconds a KEDA discovery answer is reused; installing KEDA is noticed within this time.
KEDA_CHECK_SECONDS = 60.0
logger = logging.getLogger(__name__)

#: emit(isvc, type, reason, message): posts a Kubernetes Event about ``isvc`` (type Normal|Warning).
EventSink = Callable[[Mapping[str, Any], str, str, str], None]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Outcome:
    """What one reconcile did.

    Attributes:
        found: the isvc exists and is not being deleted.
        invalid: the InvalidSpec message, or None.
        created / updated: ``Kind/name`` of children the apply created or changed.
        deleted: ``Kind/name`` of the other mode's autoscaler removed after a mode switch.
        status_written: the status subresource was patched.
        ready: the Ready condition's status after this reconcile ("True", "False", "Unknown").
    """

    found: bool = True
    invalid: str | None = None
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    status_written: bool = False
    ready: str = "Unknown"


def _ready_condition(status: Mapping[str, Any] | None) -> Mapping[str, Any]:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == READY:
            return cond
    return {}


class Reconciler:
    """Reconciles InferenceServices through a :class:`Kube` client; one call at a time per object.

    Args:
        kube: the API client.
        config: operator settings (default image, probe and drain timings).
        emit: the Event sink.
        clock: returns the current UTC time (condition timestamps).
    """

    def __init__(
        self, kube: Kube, config: OperatorConfig, emit: EventSink, clock: Callable[[], dt.datetime] = _utcnow
    ) -> None:
        self.kube = kube
        self.config = config
        self.emit = emit
        self.clock = clock
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._last_failure: dict[tuple[str, str], str] = {}
        self._keda: tuple[float, bool] | None = None  # (monotonic time asked, served)
        self.poller = (
            ModelPoller(config.model_poll_timeout_seconds, config.model_poll_concurrency,
                        allowed_networks=config.model_poll_networks)
            if config.model_poll else None
        )

    def keda_installed(self) -> bool:
        """Whether the API server serves KEDA's ``keda.sh/v1alpha1`` (its CRDs are installed),
        asked through discovery at most once per ``KEDA_CHECK_SECONDS``.

        Raises:
            KubeError: discovery failed for another reason than 404.
        """
        now = time.monotonic()
        if self._keda is None or now - self._keda[0] > KEDA_CHECK_SECONDS:
            self._keda = (now, self.kube.serves(SCALED_OBJECT_API_VERSION))
        return self._keda[1]

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def _warn_once(self, isvc: Mapping[str, Any], message: str) -> None:
        """Post an ApplyFailed Warning unless the previous failure of this isvc said the same
        (retries of one outage make one Event, not one per attempt)."""
        key = (isvc["metadata"]["namespace"], isvc["metadata"]["name"])
        if self._last_failure.get(key) != message:
            self._last_failure[key] = message
            self.emit(isvc, "Warning", "ApplyFailed", message)

    def _remove_other_autoscaler(
        self, isvc: Mapping[str, Any], keda: bool, keda_installed: bool, outcome: Outcome
    ) -> None:
        """Delete the autoscaler of the mode the isvc does not use (after a switch between
        ``hpa`` and ``keda``), if this isvc controls it, so two autoscalers never fight over
        the Deployment's replicas."""
        meta = isvc["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if keda:
            stale = (HPA_API_VERSION, "HorizontalPodAutoscaler")
        elif self.keda_installed():
            stale = (SCALED_OBJECT_API_VERSION, "ScaledObject")
        else:
            return
        obj = self.kube.get(*stale, namespace, name)
        owners = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
        if obj is None or not any(ref.get("uid") == uid and ref.get("controller") for ref in owners):
            return
        if self.kube.delete(*stale, namespace, name):
            outcome.deleted.append(f"{stale[1]}/{name}")
            self.emit(isvc, "Normal", "Deleted", f"deleted {stale[1]} {name}: scaling.autoscaler is now "
                      f"{'keda' if keda else 'hpa'}")

    def reconcile(self, namespace: str, name: str) -> Outcome:
        """Bring the children and status of isvc ``namespace/name`` in line with its spec.

        A spec the operator cannot serve (parse failure, or a child the API server rejects
        with 400/422) is not an error here: it yields Ready=False/InvalidSpec, one Warning
        Event per distinct message, and a normal return, so nothing retries until the spec
        changes. Existing children are left as they are meanwhile.

        Raises:
            KubeError: a transient API failure (connection, 409, 5xx); the caller retries.
        """
        with self._lock(namespace, name):
            isvc = self.kube.get(ISVC_API_VERSION, KIND, namespace, name)
            if isvc is None or (isvc.get("metadata") or {}).get("deletionTimestamp"):
                return Outcome(found=False)
            return self._reconcile(isvc)

    def _reconcile(self, isvc: dict[str, Any]) -> Outcome:
        meta = isvc["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        outcome = Outcome()
        spec = None
        try:
            spec = parse_spec(isvc.get("spec"), name)
        except InvalidSpecError as err:
            outcome.invalid = str(err)
        keda = spec is not None and spec.scaling.autoscaler == "keda"
        keda_installed = self.keda_installed() if keda else True
        if spec is not None:
            children = render_children(Owner(name, namespace, meta["uid"]), spec, self.config)
            objects = children.in_order()
            if keda and not keda_installed:  # nothing can hold a ScaledObject; say so in the status
                objects = [o for o in objects if o is not children.scaled_object]
            for obj in objects:
                kind, child = obj["kind"], obj["metadata"]["name"]
                before = self.kube.get(obj["apiVersion"], kind, namespace, child)
                try:
                    after = self.kube.apply(obj)
                except KubeError as err:
                    if not err.invalid:
                        self._warn_once(isvc, f"{kind} {child}: {err}")
                        raise
                    outcome.invalid = f"the API server rejected {kind} {child}: {err.message}"
                    break
                if before is None:
                    outcome.created.append(f"{kind}/{child}")
                    self.emit(isvc, "Normal", "Created", f"created {kind} {child}")
                elif before["metadata"].get("resourceVersion") != after["metadata"].get("resourceVersion"):
                    outcome.updated.append(f"{kind}/{child}")
                    self.emit(isvc, "Normal", "Updated", f"updated {kind} {child}")
            if outcome.invalid is None:
                self._remove_other_autoscaler(isvc, keda, keda_installed, outcome)
        self._last_failure.pop((namespace, name), None)
        deployment = self.kube.get("apps/v1", "Deployment", namespace, name)
        hpa = self.kube.get(HPA_API_VERSION, "HorizontalPodAutoscaler", namespace, keda_hpa_name(name) if keda else name)
        scaled_object = (
            self.kube.get(SCALED_OBJECT_API_VERSION, "ScaledObject", namespace, name) if keda and keda_installed else None
        )
        models = None
        if spec is not None and self.poller is not None and deployment is not None:
            answers = self.poller.poll(self.kube.list_pods(namespace, selector_labels(name)))
            if answers:  # else no pod to ask (or none the operator may reach): derive from readiness
                models = summarise(spec, answers)
        new_status = compute_status(
            isvc, spec, outcome.invalid, deployment, hpa, self.clock(),
            scaled_object=scaled_object, keda_installed=keda_installed, models=models,
        )
        previous_ready = _ready_condition(isvc.get("status"))
        if outcome.invalid is not None and (
            previous_ready.get("reason") != INVALID_SPEC or previous_ready.get("message") != outcome.invalid
        ):
            self.emit(isvc, "Warning", INVALID_SPEC, outcome.invalid)
        outcome.ready = _ready_condition(new_status).get("status", "Unknown")
        if status_changed(isvc.get("status"), new_status):
            try:
                self.kube.patch_isvc_status(namespace, name, new_status)
                outcome.status_written = True
            except KubeError as err:
                if err.status != 404:  # 404: deleted meanwhile, nothing to report on
                    raise
        return outcome
