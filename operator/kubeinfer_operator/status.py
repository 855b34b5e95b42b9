"""Pure status computation: children's observed state -> the InferenceService ``status``.

Conditions follow metav1.Condition (Kubernetes API conventions, "Typical status properties"):
``type``, ``status`` (True/False/Unknown), a CamelCase ``reason`` that is never empty, a
human ``message``, ``observedGeneration`` (the isvc generation this was computed for) and
``lastTransitionTime``, which changes only when ``status`` flips.

* ``DeploymentAvailable``: the Deployment's own ``Available`` condition (its definition of
  minimum availability), False on ``ProgressDeadlineExceeded``.
* ``AutoscalerReady``: the HPA controller accepted the HPA (``AbleToScale``) and can read
  the queue-length metric (``ScalingActive``); with minReplicas == maxReplicas no metric is
  needed, so a missing metric does not make it False. With ``autoscaler: none`` always True
  (reason ``FixedReplicas``). In keda mode first: KEDA's API is
  served (else ``KedaNotInstalled``), the ScaledObject is ``Ready``, and a Deployment that
  KEDA scaled to zero is fine (``ScaledToZero``); then the HPA KEDA created, as above.
* ``ModelsReady``: a serving pod is ready, i.e. every preloaded model is loaded (the
  serving pod's ``/ready`` is true exactly then).
* ``RouterReady``: in ``routing.mode: router`` the router Deployment ``NAME-router``'s
  ``Available`` condition (as DeploymentAvailable reads the serving one; False with reason
  ``RouterMissing`` before it exists); in ``service`` mode always True with reason
  ``ServiceMode`` (no router is wanted, so nothing is missing), so the condition list has the
  same types in both modes.
* ``Ready``: the roll-up: False with reason ``InvalidSpec`` for a spec the operator cannot
  serve, else the first of DeploymentAvailable, RouterReady, AutoscalerReady that is not True.

``status.routerSummary`` (the ``Router`` column of ``kubectl get isvc``) is the router pods'
``ready/desired`` in router mode and ``service`` in service mode.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.models_poll import model_summary
from kubeinfer_operator.render_base import selector_labels
from kubeinfer_operator.render_service import service_url
from kubeinfer_operator.spec import InferenceServiceSpec

READY = "Ready"
DEPLOYMENT_AVAILABLE = "DeploymentAvailable"
AUTOSCALER_READY = "AutoscalerReady"
MODELS_READY = "ModelsReady"
ROUTER_READY = "RouterReady"
INVALID_SPEC = "InvalidSpec"
SERVICE_MODE = "ServiceMode"
FIXED_REPLICAS = "FixedReplicas"
CONDITION_ORDER = (READY, DEPLOYMENT_AVAILABLE, ROUTER_READY, AUTOSCALER_READY, MODELS_READY)


@dataclass(frozen=True)
class Verdict:
    """One condition's status, reason and message before timestamps are attached."""

    status: str
    reason: str
    message: str


def rfc3339(now: dt.datetime) -> str:
    """``now`` as the API server writes metav1.Time: UTC, whole seconds, ``Z`` suffix."""
    return now.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions_by_type(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c.get("type"): c for c in conditions if isinstance(c, Mapping)}


def deployment_verdict(deployment: Mapping[str, Any] | None) -> Verdict:
    """DeploymentAvailable from the Deployment object (None when it does not exist)."""
    if deployment is None:
        return Verdict("False", "DeploymentMissing", "the serving Deployment does not exist yet")
    conditions = _conditions_by_type(deployment)
    progressing = conditions.get("Progressing")
    if progressing and progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Verdict("False", "ProgressDeadlineExceeded", progressing.get("message") or "rollout stalled")
    available = conditions.get("Available")
    if available is None:
        return Verdict("Unknown", "DeploymentPending", "the deployment controller has not reported availability yet")
    status = deployment.get("status") or {}
    desired = (deployment.get("spec") or {}).get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    generation = (deployment.get("metadata") or {}).get("generation", 0)
    if available.get("status") == "True" and (
        status.get("observedGeneration", 0) < generation or updated < desired
    ):
        return Verdict("True", "RollingUpdate", f"available while rolling out: {updated} of {desired} pods updated")
    return Verdict(
        str(available.get("status", "Unknown")),
        available.get("reason") or "DeploymentAvailability",
        available.get("message") or "",
    )


def router_verdict(spec: InferenceServiceSpec | None, router: Mapping[str, Any] | None) -> Verdict:
    """RouterReady from the router Deployment (None when it does not exist); see the module docstring."""
    if spec is None:
        return Verdict("Unknown", INVALID_SPEC, "routing.mode cannot be read from the spec")
    if not spec.router_mode:
        return Verdict("True", SERVICE_MODE, "routing.mode is service: the Service selects the serving pods; no router")
    if router is None:
        return Verdict("False", "RouterMissing", "the router Deployment does not exist yet")
    verdict = deployment_verdict(router)
    if verdict.status != "True":
        return verdict
    ready = int(((router.get("status") or {}).get("readyReplicas")) or 0)
    return Verdict("True", verdict.reason, f"{ready} router pod(s) ready; {verdict.message}".rstrip("; "))


def router_summary(spec: InferenceServiceSpec | None, router: Mapping[str, Any] | None) -> str:
    """``status.routerSummary``: ``ready/desired`` router pods in router mode, ``service`` in
    service mode, empty for an invalid spec."""
    if spec is None:
        return ""
    if not spec.router_mode:
        return "service"
    ready = int((((router or {}).get("status") or {}).get("readyReplicas")) or 0)
    desired = int((((router or {}).get("spec") or {}).get("replicas")) or spec.routing.replicas)
    return f"{ready}/{desired}"


def _keda_verdict(
    spec: InferenceServiceSpec, scaled_object: Mapping[str, Any] | None, keda_installed: bool, replicas: int
) -> Verdict | None:
    """The KEDA part of AutoscalerReady, or None when the HPA KEDA created decides it."""
    if not keda_installed:
        return Verdict(
            "False",
            "KedaNotInstalled",
            "scaling.autoscaler is keda but the API server does not serve keda.sh/v1alpha1: install KEDA "
            "(its CRDs and operator), or set scaling.autoscaler: hpa; the Deployment runs unscaled meanwhile",
        )
    if scaled_object is None:
        return Verdict("False", "AutoscalerMissing", "the KEDA ScaledObject does not exist yet")
    ready = _conditions_by_type(scaled_object).get("Ready")
    if ready is None or ready.get("status") == "Unknown":
        return Verdict("Unknown", "AutoscalerPending", "KEDA has not reported on the ScaledObject yet")
    if ready.get("status") != "True":
        return Verdict("False", ready.get("reason") or "ScaledObjectNotReady", ready.get("message") or "")
    if spec.scaling.min_replicas == 0 and replicas == 0:
        front = (
            f"the router holds requests for up to routing.holdTimeoutSeconds ({spec.routing.hold_timeout_seconds} s); "
            f"KEDA scales up when the queue (requests held by the router included)"
            if spec.router_mode else
            "the activator answers requests with 503 and Retry-After; KEDA scales up when the queue "
            "(requests pending at the activator included)"
        )
        return Verdict(
            "True",
            "ScaledToZero",
            f"scaled to zero: {front} exceeds activationQueueLength ({spec.scaling.activation_queue_length})",
        )
    return None


def autoscaler_verdict(
    hpa: Mapping[str, Any] | None,
    spec: InferenceServiceSpec | None,
    scaled_object: Mapping[str, Any] | None = None,
    keda_installed: bool = True,
    replicas: int = 0,
) -> Verdict:
    """AutoscalerReady from the HPA object (None when it does not exist) and, for
    ``scaling.autoscaler: keda``, the ScaledObject and whether KEDA's API is served.

    Args:
        hpa: the HPA that scales the Deployment (the operator's, or the one KEDA created).
        spec: the parsed spec, or None when invalid.
        scaled_object: the KEDA ScaledObject child (keda mode), or None.
        keda_installed: whether the API server serves keda.sh/v1alpha1.
        models: ``status.models`` from polling the pods (None: not polled; derived from readiness).
        replicas: the Deployment's desired replica count (0 when KEDA scaled it to zero).
    """
    if spec is not None and spec.fixed_replicas is not None:
        return Verdict("True", FIXED_REPLICAS, f"scaling.autoscaler none: {spec.fixed_replicas} replica(s) "
                       "(spec.replicas, which kubectl scale sets)")
    keda = spec is not None and spec.scaling.autoscaler == "keda"
    if keda:
        verdict = _keda_verdict(spec, scaled_object, keda_installed, replicas)
        if verdict is not None:
            return verdict
    if hpa is None:
        return Verdict("False", "AutoscalerMissing", "the HorizontalPodAutoscaler does not exist yet")
    conditions = _conditions_by_type(hpa)
    able = conditions.get("AbleToScale")
    active = conditions.get("ScalingActive")
    if able is None or active is None:
        return Verdict("Unknown", "AutoscalerPending", "the horizontal-pod-autoscaler controller has not reported yet")
    if able.get("status") != "True":
        return Verdict("False", able.get("reason") or "UnableToScale", able.get("message") or "")
    if active.get("status") != "True":
        fixed = spec is not None and spec.scaling.min_replicas == spec.scaling.max_replicas
        if fixed:
            return Verdict(
                "True",
                FIXED_REPLICAS,
                f"minReplicas == maxReplicas == {spec.scaling.min_replicas}: no metric needed "
                f"({active.get('reason')}: {active.get('message', '')})",
            )
        hint = (
            "is KEDA's metrics adapter serving external.metrics.k8s.io, and can it query Prometheus?"
            if keda else "is a custom-metrics adapter serving kubeinfer_queue_length?"
        )
        return Verdict("False", active.get("reason") or "ScalingInactive", f"{active.get('message', '')} ({hint})")
    return Verdict("True", active.get("reason") or "ScalingActive", active.get("message") or "")


def models_verdict(
    spec: InferenceServiceSpec | None, ready_replicas: int, models: list[dict[str, Any]] | None = None
) -> Verdict:
    """ModelsReady. With polled per-pod state (``models``, from :func:`~kubeinfer_operator.models_poll.summarise`):
    False/ModelLoadFailed when a model failed to load in a pod (the pod's reason in the
    message), False/NoReadyPods without a ready pod, else True. Without it: True once a pod is
    ready, since /ready means every preloaded model is loaded."""
    if spec is None:
        return Verdict("Unknown", INVALID_SPEC, "the model list cannot be read from the spec")
    if models is not None:
        failed = [m for m in models if m["state"] == "Failed"]
        if failed:
            return Verdict("False", "ModelLoadFailed",
                           "; ".join(f"{m['name']}: {m['message']}" for m in failed)[:1024])
    preloaded = sum(1 for m in spec.models if m.preload)
    if ready_replicas > 0:
        return Verdict(
            "True",
            "PreloadedModelsLoaded",
            f"{preloaded} preloaded model(s) loaded on {ready_replicas} ready pod(s); "
            f"{len(spec.models) - preloaded} load on first request",
        )
    return Verdict("False", "NoReadyPods", "no serving pod is ready yet")


def model_states(spec: InferenceServiceSpec | None, ready_replicas: int) -> list[dict[str, Any]]:
    """``status.models`` when the pods were not polled: preloaded models are Loaded on every
    ready pod (that is what /ready means); on-demand ones stay Pending."""
    if spec is None:
        return []
    out: list[dict[str, Any]] = []
    for m in spec.models:
        counts = {"servedModelName": m.served_name, "readyPods": ready_replicas, "loadedPods": ready_replicas if m.preload else 0, "failedPods": 0}
        if m.preload and ready_replicas > 0:
            out.append({"name": m.name, "state": "Loaded", **counts, "message": "preloaded; a ready pod has it loaded"})
        elif m.preload:
            out.append({"name": m.name, "state": "Pending", **counts,
                        "message": "preloaded at pod start; no pod is ready yet"})
        else:
            out.append({"name": m.name, "state": "Pending", **counts, "message": "loaded on demand by the first request"})
    return out


def ready_verdict(
    invalid: str | None, deployment: Verdict, autoscaler: Verdict, router: Verdict | None = None
) -> Verdict:
    """The Ready roll-up (see the module docstring)."""
    if invalid is not None:
        return Verdict("False", INVALID_SPEC, invalid)
    for part in (deployment, router, autoscaler):
        if part is not None and part.status != "True":
            return part
    front = "router" if router is not None and router.reason != SERVICE_MODE else "Service"
    return Verdict("True", "Available", f"serving pods available, {front} ready, autoscaler ready")


def merge_conditions(
    previous: Iterable[Mapping[str, Any]] | None,
    verdicts: Mapping[str, Verdict],
    generation: int,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """Build the condition list, keeping ``lastTransitionTime`` where the status did not flip.

    Args:
        previous: the current ``status.conditions`` (may be None).
        verdicts: condition type -> :class:`Verdict`.
        generation: the isvc ``metadata.generation`` these verdicts were computed for.
        now: the time stamped on conditions whose status changed (or that are new).
    """
    before = {c.get("type"): c for c in previous or [] if isinstance(c, Mapping)}
    out = []
    for ctype in sorted(verdicts, key=lambda t: CONDITION_ORDER.index(t) if t in CONDITION_ORDER else 99):
        verdict = verdicts[ctype]
        old = before.get(ctype)
        changed = old is None or old.get("status") != verdict.status or not old.get("lastTransitionTime")
        out.append(
            {
                "type": ctype,
                "status": verdict.status,
                "reason": verdict.reason,
                "message": verdict.message,
                "observedGeneration": generation,
                "lastTransitionTime": rfc3339(now) if changed else old["lastTransitionTime"],
            }
        )
    return out


def scale_selector(name: str) -> str:
    """``status.selector``, the scale subresource's ``labelSelectorPath``: the serving pods'
    selector as a label-selector string (what ``kubectl get --subresource scale`` and tools that
    drive ``/scale``, such as an HPA or VPA targeting the isvc, read)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def compute_status(
    isvc: Mapping[str, Any],
    spec: InferenceServiceSpec | None,
    invalid: str | None,
    deployment: Mapping[str, Any] | None,
    hpa: Mapping[str, Any] | None,
    now: dt.datetime,
    scaled_object: Mapping[str, Any] | None = None,
    keda_installed: bool = True,
    models: list[dict[str, Any]] | None = None,
    router: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole ``status`` of ``isvc`` from its parsed spec and its children.

    Args:
        isvc: the InferenceService object (metadata and current status are read).
        spec: the parsed spec, or None when it is invalid.
        invalid: the InvalidSpec message, or None when the spec is fine.
        deployment: the Deployment child as read from the API, or None when absent.
        hpa: the HPA that scales the Deployment as read from the API (the operator's child in
            hpa mode, KEDA's ``keda-hpa-NAME`` in keda mode), or None when absent.
        now: the current time (timestamps of changed conditions).
        scaled_object: the KEDA ScaledObject child (keda mode), or None.
        keda_installed: whether the API server serves keda.sh/v1alpha1.
        models: ``status.models`` from polling the pods (None: not polled; derived from readiness).
        router: the router Deployment ``NAME-router`` (router mode), or None when absent.
    """
    meta = isvc.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    dep_status = (deployment or {}).get("status") or {}
    replicas = int(dep_status.get("replicas") or 0)
    ready = int(dep_status.get("readyReplicas") or 0)
    if deployment is not None:
        desired = int((deployment.get("spec") or {}).get("replicas") or 0)
    else:
        desired = (spec.fixed_replicas if spec.fixed_replicas is not None else spec.scaling.min_replicas) if spec else 0
    dep_v = deployment_verdict(deployment)
    hpa_v = autoscaler_verdict(hpa, spec, scaled_object, keda_installed, desired)
    router_v = router_verdict(spec, router)
    verdicts = {
        READY: ready_verdict(invalid, dep_v, hpa_v, router_v),
        DEPLOYMENT_AVAILABLE: dep_v,
        ROUTER_READY: router_v,
        AUTOSCALER_READY: hpa_v,
        MODELS_READY: models_verdict(spec, ready, models),
    }
    models_list = models if models is not None and spec is not None else model_states(spec, ready)
    previous = (isvc.get("status") or {}).get("conditions")
    raw_models = ((isvc.get("spec") or {}).get("models")) or []
    names = [m.name for m in spec.models] if spec else [
        str(m.get("name")) for m in raw_models if isinstance(m, Mapping) and m.get("name")
    ]
    return {
        "observedGeneration": generation,
        "url": service_url(meta.get("name", ""), meta.get("namespace", "")),
        "replicas": replicas,
        "readyReplicas": ready,
        "selector": scale_selector(meta.get("name", "")),
        "replicaSummary": f"{ready}/{desired}",
        "routerSummary": router_summary(spec, router),
        "modelNames": ",".join(names),
        "models": models_list,
        "modelSummary": model_summary(models_list),
        "conditions": merge_conditions(previous, verdicts, generation, now),
    }


def status_changed(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """True when writing ``new`` would change the stored status (ignoring unknown extra keys)."""
    current = current or {}
    return any(current.get(key) != value for key, value in new.items())
