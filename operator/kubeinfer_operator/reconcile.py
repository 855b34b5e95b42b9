"""One reconcile of one InferenceService: read it, render its children, apply them, write status.

Level-triggered: every call re-derives everything from the isvc and its children as stored now,
so a call caused by the isvc, by a child's change or deletion, or by a periodic resync does the
same thing, and repeating it changes nothing (server-side apply of identical content is a
no-op on the server: no new resourceVersion, no rollout).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeinfer_operator import metrics
from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.kube import Kube, KubeError
from kubeinfer_operator.models_poll import ModelPoller, summarise
from kubeinfer_operator.render import render_children, stale_router_objects
from kubeinfer_operator.render_activator import activator_name, render_activator, wants_activator
from kubeinfer_operator.render_autoscaling import SCALED_OBJECT_API_VERSION, keda_hpa_name
from kubeinfer_operator.render_base import Owner
from kubeinfer_operator.render_router import router_name
from kubeinfer_operator.spec import InferenceServiceSpec, InvalidSpecError, parse_spec
from kubeinfer_operator.status import INVALID_SPEC, READY, compute_status, status_changed

HPA_API_VERSION = "autoscaling/v2"
#: Seconds a KEDA discovery answer is reused; installing KEDA is noticed within this time.
KEDA_CHECK_SECONDS = 60.0
logger = logging.getLogger(__name__)

#: emit(isvc, type, reason, message): posts a Kubernetes Event about ``isvc`` (type Normal|Warning).
EventSink = Callable[[Mapping[str, Any], str, str, str], None]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Observed:
    """What the operator's watches (kopf indexes) hold for one isvc.

    Attributes:
        children: (kind, name) -> the child object as last watched (ConfigMap, Service,
            Deployment, the HPA - the operator's or KEDA's).
        pods: the isvc's serving pods as last watched.
    """

    children: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)


def fingerprint(obj: Mapping[str, Any]) -> str:
    """What changes when someone changes a stored object, but not when only its status moves:
    ``metadata.generation`` (bumped by spec changes) plus a hash of labels, annotations and
    owner references for kinds with a generation (Deployment, HPA, ScaledObject), else the
    resourceVersion (ConfigMap, Service)."""
    meta = obj.get("metadata") or {}
    if "generation" not in meta:
        return f"rv:{meta.get('resourceVersion')}"
    rest = {k: meta.get(k) for k in ("labels", "annotations", "ownerReferences")}
    return f"gen:{meta['generation']}:{content_hash(rest)[:16]}"


def newest(*objs: Mapping[str, Any] | None) -> Any:
    """The most recent of several copies of one object (highest resourceVersion when they are
    numbers, as the API server's are in practice; else the first present), or None."""
    present = [o for o in objs if o is not None]
    if not present:
        return None
    try:
        return max(present, key=lambda o: int(o["metadata"]["resourceVersion"]))
    except (KeyError, TypeError, ValueError):
        return present[0]


def _generation(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 0)


def content_hash(obj: Mapping[str, Any]) -> str:
    """SHA-256 of a rendered object's canonical JSON: equal renders give equal hashes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Outcome:
    """What one reconcile did.

    Attributes:
        found: the isvc exists and is not being deleted.
        invalid: the InvalidSpec message, or None.
        created / updated: ``Kind/name`` of children the apply created or changed.
        deleted: ``Kind/name`` of children removed: the other mode's autoscaler or router objects
            after a mode switch, an activator no longer needed.
        status_written: the status subresource was patched.
        status_changes: the top-level status fields that patch changed.
        ready: the Ready condition's status after this reconcile ("True", "False", "Unknown").
    """

    found: bool = True
    invalid: str | None = None
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    status_written: bool = False
    status_changes: list[str] = field(default_factory=list)
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
        #: (namespace, kind, name) -> (content hash, :func:`fingerprint`, generation) of this
        #: process' last apply of that child.
        self._applied: dict[tuple[str, str, str], tuple[str, str, int]] = {}
        self._mode_checked: dict[tuple[str, str], str] = {}
        #: (namespace, kind, name) -> the newest copy of a child seen (see :meth:`_latest`).
        self._seen: dict[tuple[str, str, str], Any] = {}
        #: (namespace, name) -> the isvc as our last status write returned it.
        self._written: dict[tuple[str, str], dict[str, Any]] = {}
        self.poller = (
            ModelPoller(config.model_poll_timeout_seconds, config.model_poll_concurrency,
                        allowed_networks=config.model_poll_networks)
            if config.model_poll else None
        )

    def forget(self, namespace: str, kind: str, name: str) -> None:
        """A child was deleted: the next reconcile applies it again whatever the watches show."""
        self._applied.pop((namespace, kind, name), None)
        self._seen.pop((namespace, kind, name), None)

    def _latest(self, namespace: str, kind: str, name: str, *copies: Mapping[str, Any] | None) -> Any:
        """The newest copy of a child among ``copies`` and the newest this process saw before,
        so a reconcile working from a lagging watch never reports an older state than an
        earlier reconcile did (status would flip back and forth)."""
        key = (namespace, kind, name)
        best = newest(*copies, self._seen.get(key))  # a deletion clears the memory (forget())
        if best is not None:
            self._seen[key] = best
        return best

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
        self, isvc: Mapping[str, Any], mode: str, outcome: Outcome, observed: Observed,
    ) -> None:
        """Delete the autoscalers of the modes the isvc does not use (after a switch between
        ``hpa``, ``keda`` and ``none``), if this isvc controls them, so two autoscalers never
        fight over the Deployment's replicas. A watched HPA is checked from ``observed``; a
        ScaledObject (not watched) is looked up once per isvc and mode in this process."""
        meta = isvc["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if mode != "hpa":
            stale = (HPA_API_VERSION, "HorizontalPodAutoscaler")
            obj = observed.children.get(("HorizontalPodAutoscaler", name))
            self._delete_if_controlled(isvc, stale, obj, mode, outcome)
        if mode != "keda":
            stale = (SCALED_OBJECT_API_VERSION, "ScaledObject")
            if self._mode_checked.get((namespace, name)) == mode or not self.keda_installed():
                return
            obj = self.kube.get(*stale, namespace, name)
            self._delete_if_controlled(isvc, stale, obj, mode, outcome)
        self._mode_checked[(namespace, name)] = mode

    def _delete_if_controlled(
        self, isvc: Mapping[str, Any], stale: tuple[str, str], obj: Mapping[str, Any] | None, mode: str,
        outcome: Outcome,
    ) -> None:
        """Delete autoscaler ``obj`` (``stale`` = its apiVersion, kind) if this isvc controls it."""
        meta = isvc["metadata"]
        owners = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
        if obj is None or not any(ref.get("uid") == meta["uid"] and ref.get("controller") for ref in owners):
            return
        if self.kube.delete(*stale, meta["namespace"], meta["name"]):
            outcome.deleted.append(f"{stale[1]}/{meta['name']}")
            self.emit(isvc, "Normal", "Deleted", f"deleted {stale[1]} {meta['name']}: scaling.autoscaler is now {mode}")

    def reconcile(self, namespace: str, name: str, isvc: Mapping[str, Any] | None, observed: Observed) -> Outcome:
        """Bring the children and status of isvc ``namespace/name`` in line with its spec.

        Args:
            isvc: the object as kopf delivered it (or as an index or the API holds it); None when
                it does not exist.
            observed: what the operator's watches hold of the children and pods (kopf indexes).
                No child is read from the API: a child whose rendered content and
                resourceVersion equal what this process last applied is not applied again,
                and status comes from the watched (or just applied) objects. (KEDA's
                ScaledObject, which is not watched, is the one child read.)

        A spec the operator cannot serve (parse failure, or a child the API server rejects
        with 400/422) is not an error here: it yields Ready=False/InvalidSpec, one Warning
        Event per distinct message, and a normal return, so nothing retries until the spec
        changes. Existing children are left as they are meanwhile.

        Each call is counted in ``kubeinfer_operator_reconciles_total{result}`` and timed in
        ``kubeinfer_operator_reconcile_duration_seconds`` (:mod:`kubeinfer_operator.metrics`).

        Raises:
            KubeError: a transient API failure (connection, 409, 5xx); the caller retries.
        """
        result = metrics.ERROR
        metrics.IN_PROGRESS.inc()
        started = time.monotonic()
        try:
            with self._lock(namespace, name):
                if isvc is None or (isvc.get("metadata") or {}).get("deletionTimestamp"):
                    result = metrics.NOT_FOUND
                    return Outcome(found=False)
                outcome = self._reconcile(dict(isvc), observed)
                result = metrics.INVALID_SPEC if outcome.invalid is not None else metrics.OK
                return outcome
        finally:
            metrics.IN_PROGRESS.dec()
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
            metrics.RECONCILES.labels(result=result).inc()

    def _apply_child(
        self, isvc: Mapping[str, Any], obj: dict[str, Any], observed: Observed, outcome: Outcome
    ) -> dict[str, Any] | None:
        """Apply one child unless ``observed`` shows it unchanged since this process applied the
        same content; record created/updated; return the object as stored (None when skipped)."""
        meta = isvc["metadata"]
        namespace, kind, child = meta["namespace"], obj["kind"], obj["metadata"]["name"]
        digest = content_hash(obj)
        key = (namespace, kind, child)
        seen = observed.children.get((kind, child))
        seen_print = fingerprint(seen) if seen is not None else None
        last = self._applied.get(key)
        if last is not None and last[0] == digest and (
            seen is None  # applied, but the watch has not delivered it yet (a deletion calls forget())
            or seen_print == last[1]  # nobody changed it since our identical apply
            or _generation(seen) < last[2]  # the watch still shows an older version than ours
        ):
            return None
        created, after = self.kube.apply_status(obj)
        before_print = seen_print if seen is not None else (last[1] if last else None)
        after_print = fingerprint(after)
        self._applied[key] = (digest, after_print, _generation(after))
        if created:
            outcome.created.append(f"{kind}/{child}")
            self.emit(isvc, "Normal", "Created", f"created {kind} {child}")
        elif before_print is not None and before_print != after_print:
            outcome.updated.append(f"{kind}/{child}")
            self.emit(isvc, "Normal", "Updated", f"updated {kind} {child}")
        return after

    def _delete_owned(
        self, isvc: Mapping[str, Any], api_version: str, kind: str, child: str, observed: Observed,
        outcome: Outcome, why: str,
    ) -> None:
        """Delete child ``kind/child`` if it exists and this isvc controls it; post a Deleted
        Event saying ``why``. The watches (``observed``) say whether it exists; one this process
        applied that the watch has not shown yet is deleted too."""
        meta = isvc["metadata"]
        namespace = meta["namespace"]
        current = observed.children.get((kind, child))
        if current is None and (namespace, kind, child) not in self._applied:
            return
        owners = ((current or {}).get("metadata") or {}).get("ownerReferences") or []
        if current is not None and not any(r.get("uid") == meta["uid"] and r.get("controller") for r in owners):
            return
        if self.kube.delete(api_version, kind, namespace, child):
            outcome.deleted.append(f"{kind}/{child}")
            self.emit(isvc, "Normal", "Deleted", f"deleted {kind} {child}: {why}")
        self.forget(namespace, kind, child)

    def _reconcile_activator(
        self, isvc: Mapping[str, Any], spec: InferenceServiceSpec, deployment: Mapping[str, Any] | None,
        keda_installed: bool, observed: Observed, outcome: Outcome,
    ) -> None:
        """Run the activator Deployment while :func:`wants_activator` says so (service mode, KEDA,
        minReplicas 0, no ready serving pod), else delete it if this isvc controls one."""
        meta = isvc["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if keda_installed and wants_activator(spec, deployment):
            self._apply_child(isvc, render_activator(Owner(name, namespace, meta["uid"]), spec, self.config),
                              observed, outcome)
            return
        why = "routing.mode is router (the router holds requests at zero)" if spec.router_mode else (
            "a serving pod is ready")
        self._delete_owned(isvc, "apps/v1", "Deployment", activator_name(name), observed, outcome, why)

    def _remove_router(
        self, isvc: Mapping[str, Any], spec: InferenceServiceSpec, observed: Observed, outcome: Outcome
    ) -> None:
        """In service mode, delete the router-mode objects this isvc controls (after a switch from
        router mode); the Service ``NAME`` already selects the serving pods again."""
        meta = isvc["metadata"]
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        for api_version, kind, child in stale_router_objects(owner, spec):
            self._delete_owned(isvc, api_version, kind, child, observed, outcome, "routing.mode is service")

    def _reconcile(self, isvc: dict[str, Any], observed: Observed) -> Outcome:
        meta = isvc["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        written = self._written.get((namespace, name))
        if written is not None and newest(written, isvc) is written and written is not isvc:
            # the delivered copy predates our own last status write: judge changes against that
            isvc = {**isvc, "status": written.get("status")}
        outcome = Outcome()
        spec = None
        try:
            spec = parse_spec(isvc.get("spec"), name)
        except InvalidSpecError as err:
            outcome.invalid = str(err)
        keda = spec is not None and spec.scaling.autoscaler == "keda"
        keda_installed = self.keda_installed() if keda else True
        stored: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> object as the apply returned it
        if spec is not None:
            children = render_children(Owner(name, namespace, meta["uid"]), spec, self.config)
            objects = children.in_order()
            if keda and not keda_installed:  # nothing can hold a ScaledObject; say so in the status
                objects = [o for o in objects if o is not children.scaled_object]
            for obj in objects:
                try:
                    after = self._apply_child(isvc, obj, observed, outcome)
                except KubeError as err:
                    if not err.invalid:
                        self._warn_once(isvc, f"{obj['kind']} {obj['metadata']['name']}: {err}")
                        raise
                    outcome.invalid = f"the API server rejected {obj['kind']} {obj['metadata']['name']}: {err.message}"
                    break
                if after is not None:
                    stored[(obj["kind"], obj["metadata"]["name"])] = after
            if outcome.invalid is None:
                self._remove_other_autoscaler(isvc, spec.scaling.autoscaler, outcome, observed)
                self._remove_router(isvc, spec, observed, outcome)
        self._last_failure.pop((namespace, name), None)
        hpa_name = keda_hpa_name(name) if keda else name
        router_mode = spec is not None and spec.router_mode
        router = None
        deployment = self._latest(namespace, "Deployment", name, stored.get(("Deployment", name)),
                                  observed.children.get(("Deployment", name)))
        hpa = self._latest(namespace, "HorizontalPodAutoscaler", hpa_name,
                           None if keda else stored.get(("HorizontalPodAutoscaler", hpa_name)),
                           observed.children.get(("HorizontalPodAutoscaler", hpa_name)))
        if router_mode:
            router = self._latest(namespace, "Deployment", router_name(name),
                                  stored.get(("Deployment", router_name(name))),
                                  observed.children.get(("Deployment", router_name(name))))
        if spec is not None and outcome.invalid is None:
            self._reconcile_activator(isvc, spec, deployment, keda_installed, observed, outcome)
        scaled_object = None
        if keda and keda_installed:  # not watched (KEDA may be installed after the operator started)
            scaled_object = stored.get(("ScaledObject", name)) or self.kube.get(
                SCALED_OBJECT_API_VERSION, "ScaledObject", namespace, name)
        models = None
        if spec is not None and self.poller is not None and deployment is not None:
            answers = self.poller.poll(observed.pods)
            if answers:  # else no pod to ask (or none the operator may reach): derive from readiness
                models = summarise(spec, answers)
        new_status = compute_status(
            isvc, spec, outcome.invalid, deployment, hpa, self.clock(),
            scaled_object=scaled_object, keda_installed=keda_installed, models=models, router=router,
        )
        previous_ready = _ready_condition(isvc.get("status"))
        if outcome.invalid is not None and (
            previous_ready.get("reason") != INVALID_SPEC or previous_ready.get("message") != outcome.invalid
        ):
            self.emit(isvc, "Warning", INVALID_SPEC, outcome.invalid)
        outcome.ready = _ready_condition(new_status).get("status", "Unknown")
        if status_changed(isvc.get("status"), new_status):
            current = isvc.get("status") or {}
            outcome.status_changes = sorted(k for k, v in new_status.items() if current.get(k) != v)
            try:
                stored = self.kube.patch_isvc_status(namespace, name, new_status)
                outcome.status_written = True
                if isinstance(stored, Mapping) and (stored.get("metadata") or {}).get("resourceVersion"):
                    self._written[(namespace, name)] = dict(stored)
            except KubeError as err:
                if err.status != 404:  # 404: deleted meanwhile, nothing to report on
                    raise
        return outcome
