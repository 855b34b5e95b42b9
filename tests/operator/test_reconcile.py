"""reconcile.py against an in-memory API (plain dicts): events, InvalidSpec handling, idempotence.

Every reconcile here takes the one path production runs: the isvc as delivered and the children
as the watches hold them (:func:`watched`, what kopf's indexes would hold: every stored child);
a child deleted behind the operator's back reaches it as a DELETED event (``rec.forget``).
The real API server behaviour (server-side apply, garbage collection, CEL) is covered by
test_operator_cluster.py; here only the reconciler's own decisions are checked.
"""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.kube import KubeError
from kubeinfer_operator.reconcile import Observed, Reconciler

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


class MemoryKube:
    """Stores objects by (kind, namespace, name); apply replaces content and bumps resourceVersion
    only when the content changed, as server-side apply of identical content does."""

    def __init__(self, isvc):
        self.objects = {("InferenceService", "ns", isvc["metadata"]["name"]): isvc}
        self.version = 100
        self.reject: dict[str, KubeError] = {}
        self.status_patches = 0
        self.keda = False  # whether keda.sh/v1alpha1 is served
        self.deleted: list[tuple[str, str]] = []

    def serves(self, group_version):
        return self.keda and group_version == "keda.sh/v1alpha1"

    def delete(self, api_version, kind, namespace, name):
        self.deleted.append((kind, name))
        return self.objects.pop((kind, namespace, name), None) is not None

    def get(self, api_version, kind, namespace, name):
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def apply_status(self, obj):
        created = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]) not in self.objects
        return created, self.apply(obj)

    def apply(self, obj):
        if obj["kind"] in self.reject:
            raise self.reject[obj["kind"]]
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        old = self.objects.get(key)
        content = copy.deepcopy(dict(obj))
        if old is not None:
            same = {k: v for k, v in old.items() if k != "status"}
            same["metadata"] = {k: v for k, v in old["metadata"].items() if k != "resourceVersion"}
            if same == content:
                return copy.deepcopy(old)
        self.version += 1
        content["metadata"]["resourceVersion"] = str(self.version)
        self.objects[key] = content
        return copy.deepcopy(content)

    def patch_isvc_status(self, namespace, name, status):
        self.status_patches += 1
        self.objects[("InferenceService", namespace, name)]["status"] = copy.deepcopy(dict(status))
        return self.objects[("InferenceService", namespace, name)]


def isvc(spec):
    return {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "svc", "namespace": "ns", "uid": "u-1", "generation": 2}, "spec": copy.deepcopy(spec)}


GOOD = {"models": [{"name": "tiny", "source": "file:///opt/kubeinfer/models/tiny-llama"}]}
#: The router-mode children (the default routing.mode) between the serving Deployment and the autoscaler.
ROUTER = ["Service/svc-pods", "ServiceAccount/svc-router", "Role/svc-router", "RoleBinding/svc-router",
          "Deployment/svc-router"]


def watched(kube):
    """What the watches would hold: every child (and serving pod) as stored now."""
    return Observed(children={(k, n): copy.deepcopy(o) for (k, ns, n), o in kube.objects.items()
                              if k not in ("InferenceService", "Pod")},
                    pods=[copy.deepcopy(o) for (k, _, _), o in kube.objects.items() if k == "Pod"])


def run(rec, name="svc"):
    """One reconcile as the operator's handlers run it: the isvc and its children as watched."""
    isvc = rec.kube.get("serving.kubeinfer.io/v1alpha1", "InferenceService", "ns", name)
    return rec.reconcile("ns", name, isvc=isvc, observed=watched(rec.kube))


def make(spec):
    kube = MemoryKube(isvc(spec))
    events: list[tuple[str, str, str]] = []
    rec = Reconciler(kube, OperatorConfig(model_poll=False), lambda obj, t, r, m: events.append((t, r, m)),
                     clock=lambda: NOW)
    return kube, rec, events


def test_first_reconcile_creates_children_and_says_so():
    kube, rec, events = make(GOOD)
    out = run(rec)
    assert out.created == ["ConfigMap/svc-models", "Service/svc", "Deployment/svc", *ROUTER,
                           "HorizontalPodAutoscaler/svc"]
    assert [(t, r) for t, r, _ in events] == [("Normal", "Created")] * 9
    status = kube.objects[("InferenceService", "ns", "svc")]["status"]
    assert status["observedGeneration"] == 2
    assert status["url"] == "http://svc.ns.svc.cluster.local"


def test_second_reconcile_is_silent():
    kube, rec, events = make(GOOD)
    run(rec)
    n_events, n_patches = len(events), kube.status_patches
    out = run(rec)
    assert (out.created, out.updated, out.status_written) == ([], [], False)
    assert (len(events), kube.status_patches) == (n_events, n_patches)


def test_spec_change_updates_and_reports():
    kube, rec, events = make(GOOD)
    run(rec)
    obj = kube.objects[("InferenceService", "ns", "svc")]
    obj["spec"]["models"].append({"name": "more", "source": "hf://o/n"})
    obj["metadata"]["generation"] = 3
    out = run(rec)
    assert out.updated == ["ConfigMap/svc-models", "Deployment/svc"]
    assert obj["status"]["observedGeneration"] == 3


def test_invalid_spec_one_event_no_children_no_exception():
    bad = {"models": [{"name": "a", "source": "file:///x"}], "resources": {"requests": {"cpu": "2"},
                                                                          "limits": {"cpu": "1"}}}
    kube, rec, events = make(bad)
    for _ in range(3):
        out = run(rec)
        assert out.invalid and "exceeds limits[cpu]" in out.invalid
    assert [r for _, r, _ in events] == ["InvalidSpec"]
    assert [k for k in kube.objects if k[0] != "InferenceService"] == []
    ready = kube.objects[("InferenceService", "ns", "svc")]["status"]["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")


def test_server_rejection_is_invalid_spec_not_a_retry():
    kube, rec, events = make(GOOD)
    kube.reject["Deployment"] = KubeError(422, "Unprocessable Entity", 'Deployment.apps "svc" is invalid: bad toleration')
    out = run(rec)
    assert out.invalid.startswith("the API server rejected Deployment svc")
    assert events[-1][1] == "InvalidSpec"


def test_transient_failure_propagates_for_retry():
    kube, rec, events = make(GOOD)
    kube.reject["Service"] = KubeError(503, "Service Unavailable", "etcd timeout")
    for _ in range(3):
        with pytest.raises(KubeError):
            run(rec)
    assert [r for _, r, _ in events if r == "ApplyFailed"] == ["ApplyFailed"]  # one Event per outage
    del kube.reject["Service"]
    run(rec)
    kube.reject["Service"] = KubeError(503, "Service Unavailable", "etcd timeout")
    kube.objects.pop(("Service", "ns", "svc"))
    rec.forget("ns", "Service", "svc")  # the DELETED event
    with pytest.raises(KubeError):
        run(rec)
    assert [r for _, r, _ in events if r == "ApplyFailed"] == ["ApplyFailed"] * 2  # a new outage is reported


def test_deleted_or_deleting_isvc_is_left_alone():
    kube, rec, events = make(GOOD)
    kube.objects[("InferenceService", "ns", "svc")]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert run(rec).found is False
    assert run(rec, "other").found is False
    assert events == []


KEDA = {**GOOD, "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 3}}


def _autoscaler_condition(kube):
    conditions = kube.objects[("InferenceService", "ns", "svc")]["status"]["conditions"]
    return next(c for c in conditions if c["type"] == "AutoscalerReady")


def test_keda_mode_without_keda_runs_the_deployment_and_says_why_it_cannot_scale():
    kube, rec, events = make(KEDA)
    out = run(rec)
    assert out.created == ["ConfigMap/svc-models", "Service/svc", "Deployment/svc", *ROUTER]
    cond = _autoscaler_condition(kube)
    assert (cond["status"], cond["reason"]) == ("False", "KedaNotInstalled")
    assert "install KEDA" in cond["message"]


def test_keda_mode_with_keda_applies_a_scaled_object():
    kube, rec, events = make(KEDA)
    kube.keda = True
    out = run(rec)
    assert "ScaledObject/svc" in out.created
    assert ("HorizontalPodAutoscaler", "ns", "svc") not in kube.objects
    assert _autoscaler_condition(kube)["reason"] == "AutoscalerPending"  # KEDA has not reported yet


def test_activator_runs_while_no_serving_pod_is_ready_and_goes_when_one_is():
    kube, rec, events = make({**KEDA, "routing": {"mode": "service"}})
    kube.keda = True
    out = run(rec)  # the serving Deployment has no ready pod yet
    assert out.created[-1] == "Deployment/svc-activator"
    assert kube.objects[("Deployment", "ns", "svc-activator")]["spec"]["replicas"] == 1
    kube.objects[("Deployment", "ns", "svc")]["status"] = {"readyReplicas": 1, "replicas": 1}
    out = run(rec)
    assert out.deleted == ["Deployment/svc-activator"]
    assert ("Deployment", "ns", "svc-activator") not in kube.objects
    assert ("Normal", "Deleted", "deleted Deployment svc-activator: a serving pod is ready") in events
    assert run(rec).deleted == []  # nothing left to delete
    kube.objects[("Deployment", "ns", "svc")]["spec"]["replicas"] = 0  # KEDA scaled it to zero
    out = run(rec)
    assert out.created == ["Deployment/svc-activator"]


def test_no_activator_for_min_replicas_above_zero_or_without_keda():
    for spec, keda in (({**GOOD, "scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 3}}, True),
                       (KEDA, False), (GOOD, True)):
        kube, rec, _ = make(spec)
        kube.keda = keda
        run(rec)
        assert ("Deployment", "ns", "svc-activator") not in kube.objects


def test_switching_modes_removes_the_other_autoscaler():
    kube, rec, events = make(GOOD)
    kube.keda = True
    run(rec)
    assert ("HorizontalPodAutoscaler", "ns", "svc") in kube.objects
    obj = kube.objects[("InferenceService", "ns", "svc")]
    obj["spec"]["scaling"] = {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 3}
    out = run(rec)
    assert out.deleted == ["HorizontalPodAutoscaler/svc"]
    assert ("ScaledObject", "ns", "svc") in kube.objects
    assert ("HorizontalPodAutoscaler", "ns", "svc") not in kube.objects
    obj["spec"]["scaling"] = {"autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 3}
    out = run(rec)
    assert out.deleted == ["ScaledObject/svc"]
    assert ("HorizontalPodAutoscaler", "ns", "svc") in kube.objects


def test_an_autoscaler_of_another_owner_is_never_deleted():
    kube, rec, events = make({**GOOD, "scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2}})
    kube.keda = True
    kube.objects[("HorizontalPodAutoscaler", "ns", "svc")] = {
        "metadata": {"name": "svc", "ownerReferences": [{"uid": "someone-else", "controller": True}]}}
    out = run(rec)
    assert out.deleted == [] and ("HorizontalPodAutoscaler", "ns", "svc") in kube.objects


class CountingKube(MemoryKube):
    """MemoryKube that counts calls and answers apply_status (201 on create) like the API server."""

    def __init__(self, isvc):
        super().__init__(isvc)
        self.calls: list[str] = []

    def get(self, api_version, kind, namespace, name):
        self.calls.append(f"GET {kind}")
        return super().get(api_version, kind, namespace, name)

    def apply(self, obj):
        self.calls.append(f"APPLY {obj['kind']}")
        return super().apply(obj)

    def patch_isvc_status(self, namespace, name, status):
        self.calls.append("PATCH status")
        return super().patch_isvc_status(namespace, name, status)


def test_reconcile_from_watched_state_reads_nothing_and_skips_unchanged_children():
    kube = CountingKube(isvc(GOOD))
    events = []
    rec = Reconciler(kube, OperatorConfig(model_poll=False), lambda o, t, r, m: events.append(r), clock=lambda: NOW)
    body = kube.objects[("InferenceService", "ns", "svc")]
    out = rec.reconcile("ns", "svc", isvc=body, observed=watched(kube))
    assert out.created == ["ConfigMap/svc-models", "Service/svc", "Deployment/svc", *ROUTER,
                           "HorizontalPodAutoscaler/svc"]
    assert [c for c in kube.calls if c.startswith("GET")] == []  # no read before or after the applies
    kube.calls.clear()
    out = rec.reconcile("ns", "svc", isvc=kube.objects[("InferenceService", "ns", "svc")], observed=watched(kube))
    assert kube.calls == [] and (out.created, out.updated) == ([], [])  # steady state: zero API requests
    kube.objects[("Service", "ns", "svc")]["spec"]["type"] = "NodePort"  # drift: someone edited the Service
    kube.objects[("Service", "ns", "svc")]["metadata"]["resourceVersion"] = "999"
    out = rec.reconcile("ns", "svc", isvc=kube.objects[("InferenceService", "ns", "svc")], observed=watched(kube))
    assert kube.calls == ["APPLY Service"] and out.updated == ["Service/svc"]
    del kube.objects[("Deployment", "ns", "svc")]  # deleted: recreated once the deletion is known
    kube.calls.clear()
    rec.reconcile("ns", "svc", isvc=kube.objects[("InferenceService", "ns", "svc")], observed=watched(kube))
    assert not [c for c in kube.calls if c.startswith("APPLY")]  # absent from the watch may be lag: no apply
    rec.forget("ns", "Deployment", "svc")  # the DELETED event
    kube.calls.clear()
    out = rec.reconcile("ns", "svc", isvc=kube.objects[("InferenceService", "ns", "svc")], observed=watched(kube))
    assert [c for c in kube.calls if c.startswith("APPLY")] == ["APPLY Deployment"]
    assert out.created == ["Deployment/svc"]


def _condition(kube, ctype):
    conditions = kube.objects[("InferenceService", "ns", "svc")]["status"]["conditions"]
    return next(c for c in conditions if c["type"] == ctype)


def _available(kube, name, ready):
    kube.objects[("Deployment", "ns", name)]["status"] = {
        "replicas": ready, "readyReplicas": ready, "updatedReplicas": ready, "observedGeneration": 0,
        "conditions": [{"type": "Available", "status": "True" if ready else "False",
                        "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable",
                        "message": "m"}]}


def test_router_ready_follows_the_router_deployment_and_gates_ready():
    kube, rec, events = make(GOOD)
    run(rec)
    assert (_condition(kube, "RouterReady")["status"], _condition(kube, "RouterReady")["reason"]) == (
        "Unknown", "DeploymentPending")
    _available(kube, "svc", 1)
    _available(kube, "svc-router", 0)
    kube.objects[("HorizontalPodAutoscaler", "ns", "svc")]["status"] = {"conditions": [
        {"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale", "message": "ok"},
        {"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric", "message": "x"}]}
    run(rec)
    ready = _condition(kube, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "MinimumReplicasUnavailable")  # the router's
    assert kube.objects[("InferenceService", "ns", "svc")]["status"]["routerSummary"] == "0/2"
    _available(kube, "svc-router", 2)
    run(rec)
    assert _condition(kube, "RouterReady")["status"] == "True"
    assert (_condition(kube, "Ready")["status"], _condition(kube, "Ready")["reason"]) == ("True", "Available")
    assert kube.objects[("InferenceService", "ns", "svc")]["status"]["routerSummary"] == "2/2"


def test_switching_routing_modes_deletes_the_other_modes_objects():
    kube, rec, events = make({**KEDA, "scaling": {**KEDA["scaling"]}})
    kube.keda = True
    run(rec)
    assert ("Deployment", "ns", "svc-router") in kube.objects
    assert ("Deployment", "ns", "svc-activator") not in kube.objects  # the router holds at zero
    obj = kube.objects[("InferenceService", "ns", "svc")]
    obj["spec"]["routing"] = {"mode": "service"}
    out = run(rec)
    assert out.deleted == ["Deployment/svc-router", "Service/svc-pods", "RoleBinding/svc-router",
                           "Role/svc-router", "ServiceAccount/svc-router"]
    assert out.created == ["Deployment/svc-activator"]
    assert kube.objects[("Service", "ns", "svc")]["spec"]["selector"] == {"serving.kubeinfer.io/inferenceservice": "svc"}
    router_ready = _condition(kube, "RouterReady")
    assert (router_ready["status"], router_ready["reason"]) == ("True", "ServiceMode")
    assert kube.objects[("InferenceService", "ns", "svc")]["status"]["routerSummary"] == "service"
    assert run(rec).deleted == []  # nothing left to delete
    obj["spec"]["routing"] = {"mode": "router"}
    out = run(rec)
    assert out.deleted == ["Deployment/svc-activator"]
    assert ("Normal", "Deleted", "deleted Deployment svc-activator: routing.mode is router (the router holds "
            "requests at zero)") in events
    assert set(ROUTER) <= set(out.created)
    assert kube.objects[("Service", "ns", "svc")]["spec"]["selector"] == {
        "serving.kubeinfer.io/inferenceservice": "svc", "app.kubernetes.io/component": "router"}


def test_router_objects_of_another_owner_are_never_deleted():
    kube, rec, events = make({**GOOD, "routing": {"mode": "service"}})
    kube.objects[("Deployment", "ns", "svc-router")] = {
        "metadata": {"name": "svc-router", "ownerReferences": [{"uid": "someone-else", "controller": True}]}}
    out = run(rec)
    assert out.deleted == [] and ("Deployment", "ns", "svc-router") in kube.objects


def test_watched_router_objects_left_from_router_mode_are_deleted_after_a_restart():
    kube = CountingKube(isvc(GOOD))
    run(Reconciler(kube, OperatorConfig(model_poll=False), lambda *a: None, clock=lambda: NOW))
    body = kube.objects[("InferenceService", "ns", "svc")]
    body["spec"]["routing"] = {"mode": "service"}
    fresh = Reconciler(kube, OperatorConfig(model_poll=False), lambda *a: None, clock=lambda: NOW)  # a new process
    kube.calls.clear()
    out = fresh.reconcile("ns", "svc", isvc=body, observed=watched(kube))
    assert sorted(out.deleted) == sorted(ROUTER)  # known from the watches (indexes), not from API reads
    assert not [c for c in kube.calls if c.startswith("GET")]
    assert not [k for k in kube.objects if k[2] in ("svc-router", "svc-pods")]
