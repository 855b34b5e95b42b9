"""status.py: what ``kubectl get isvc`` and the conditions say for a given state of the children."""

from __future__ import annotations

import datetime as dt

from kubeinfer_operator.spec import parse_spec
from kubeinfer_operator.status import Verdict, compute_status, merge_conditions, status_changed

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
T1 = T0 + dt.timedelta(minutes=5)
MODELS = [{"name": "chat", "source": "file:///m/chat", "preload": True}, {"name": "embed", "source": "hf://o/e"}]
ISVC = {"metadata": {"name": "svc", "namespace": "ns", "generation": 7}, "spec": {"models": MODELS}}


def spec(min_r=1, max_r=1):
    return parse_spec({"models": MODELS, "scaling": {"minReplicas": min_r, "maxReplicas": max_r}}, "svc")


def deployment(available="True", ready=1, desired=1, generation=3, observed=3, updated=None, reason=None):
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": observed, "replicas": desired, "readyReplicas": ready,
            "updatedReplicas": desired if updated is None else updated,
            "conditions": [
                {"type": "Available", "status": available,
                 "reason": reason or ("MinimumReplicasAvailable" if available == "True" else "MinimumReplicasUnavailable"),
                 "message": "Deployment has minimum availability."},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": "ok"},
            ],
        },
    }


def hpa(active="True", reason="ValidMetricFound", message="the HPA was able to compute the replica count"):
    return {"status": {"conditions": [
        {"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale", "message": "ok"},
        {"type": "ScalingActive", "status": active, "reason": reason, "message": message},
    ]}}


def router(ready=2, desired=2, available=None):
    """The router Deployment NAME-router (router mode, the default)."""
    return deployment(available=available or ("True" if ready else "False"), ready=ready, desired=desired)


def cond(status, ctype):
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_ready_when_deployment_available_and_autoscaler_active():
    st = compute_status(ISVC, spec(1, 3), None, deployment(), hpa(), T0, router=router())
    ready = cond(st, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Available")
    assert ready["observedGeneration"] == 7
    assert st["observedGeneration"] == 7  # the isvc's own generation, not the Deployment's (3)
    assert st["url"] == "http://svc.ns.svc.cluster.local"
    assert (st["replicas"], st["readyReplicas"], st["replicaSummary"]) == (1, 1, "1/1")
    assert st["modelNames"] == "chat,embed"
    assert [c["type"] for c in st["conditions"]] == ["Ready", "DeploymentAvailable", "RouterReady", "AutoscalerReady",
                                                     "ModelsReady"]
    assert st["routerSummary"] == "2/2"
    assert all(c["reason"] for c in st["conditions"])


def test_not_ready_while_pods_unavailable():
    st = compute_status(ISVC, spec(), None, deployment(available="False", ready=0), hpa(), T0)
    assert (cond(st, "Ready")["status"], cond(st, "Ready")["reason"]) == ("False", "MinimumReplicasUnavailable")
    assert cond(st, "ModelsReady")["status"] == "False"
    assert st["replicaSummary"] == "0/1"


def test_missing_children_are_reported_not_ready():
    st = compute_status(ISVC, spec(), None, None, None, T0)
    assert cond(st, "Ready")["reason"] == "DeploymentMissing"
    assert cond(st, "AutoscalerReady")["reason"] == "AutoscalerMissing"


def test_autoscaler_pending_before_the_controller_reports():
    st = compute_status(ISVC, spec(), None, deployment(), {"status": {}}, T0, router=router())
    assert (cond(st, "Ready")["status"], cond(st, "Ready")["reason"]) == ("Unknown", "AutoscalerPending")


def test_missing_metric_blocks_ready_only_when_scaling_is_possible():
    no_metric = hpa("False", "FailedGetPodsMetric", "unable to get metric kubeinfer_queue_length")
    fixed = compute_status(ISVC, spec(2, 2), None, deployment(), no_metric, T0, router=router())
    assert cond(fixed, "AutoscalerReady")["status"] == "True"
    assert cond(fixed, "AutoscalerReady")["reason"] == "FixedReplicas"
    assert cond(fixed, "Ready")["status"] == "True"
    elastic = compute_status(ISVC, spec(1, 4), None, deployment(), no_metric, T0, router=router())
    assert (cond(elastic, "Ready")["status"], cond(elastic, "Ready")["reason"]) == ("False", "FailedGetPodsMetric")
    assert "kubeinfer_queue_length" in cond(elastic, "Ready")["message"]


def test_invalid_spec_overrides_everything():
    st = compute_status(ISVC, None, "spec.models[0].source: bad", deployment(), hpa(), T0)
    ready = cond(st, "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "InvalidSpec", "spec.models[0].source: bad")
    assert st["observedGeneration"] == 7
    assert st["modelNames"] == "chat,embed"  # read from the raw spec


def test_rolling_update_is_available_but_says_so():
    st = compute_status(ISVC, spec(), None, deployment(desired=2, updated=1, generation=4, observed=4), hpa(), T0)
    dep = cond(st, "DeploymentAvailable")
    assert (dep["status"], dep["reason"]) == ("True", "RollingUpdate")
    assert "1 of 2" in dep["message"]


def test_stalled_rollout_is_not_available():
    d = deployment()
    d["status"]["conditions"][1] = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": "ReplicaSet has timed out progressing."}
    st = compute_status(ISVC, spec(), None, d, hpa(), T0)
    assert (cond(st, "Ready")["status"], cond(st, "Ready")["reason"]) == ("False", "ProgressDeadlineExceeded")


def test_model_states():
    pending = compute_status(ISVC, spec(), None, deployment(available="False", ready=0), hpa(), T0)
    assert [(m["name"], m["state"]) for m in pending["models"]] == [("chat", "Pending"), ("embed", "Pending")]
    ready = compute_status(ISVC, spec(), None, deployment(), hpa(), T0)
    assert [(m["name"], m["state"]) for m in ready["models"]] == [("chat", "Loaded"), ("embed", "Pending")]


def test_last_transition_time_changes_only_when_status_flips():
    first = compute_status(ISVC, spec(), None, deployment(available="False", ready=0), hpa(), T0, router=router())
    isvc = {**ISVC, "status": first}
    # Same status, different message/reason: time kept.
    same = merge_conditions(first["conditions"], {"Ready": Verdict("False", "Other", "changed text")}, 8, T1)
    assert same[0]["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert same[0]["observedGeneration"] == 8
    flipped = compute_status(isvc, spec(), None, deployment(), hpa(), T1, router=router())
    assert cond(flipped, "Ready")["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert cond(flipped, "AutoscalerReady")["lastTransitionTime"] == "2026-01-01T12:00:00Z"


def test_recomputing_an_unchanged_state_changes_nothing():
    first = compute_status(ISVC, spec(), None, deployment(), hpa(), T0)
    again = compute_status({**ISVC, "status": first}, spec(), None, deployment(), hpa(), T1)
    assert again == first
    assert not status_changed(first, again)
    assert status_changed(first, {**again, "readyReplicas": 0})


def keda_spec(min_r=0, max_r=3):
    return parse_spec({"models": MODELS, "scaling": {"autoscaler": "keda", "minReplicas": min_r,
                                                     "maxReplicas": max_r}}, "svc")


def scaled_object(ready="True", reason="ScaledObjectReady", message="ScaledObject is defined correctly"):
    return {"status": {"conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": message}]}}


def test_keda_mode_without_keda_is_not_ready_and_says_install_keda():
    st = compute_status(ISVC, keda_spec(1), None, deployment(), None, T0, keda_installed=False, router=router())
    assert (cond(st, "AutoscalerReady")["status"], cond(st, "AutoscalerReady")["reason"]) == ("False", "KedaNotInstalled")
    assert cond(st, "Ready")["reason"] == "KedaNotInstalled"


def test_keda_mode_reads_the_scaled_object_then_kedas_hpa():
    bad = compute_status(ISVC, keda_spec(1), None, deployment(), None, T0,
                         scaled_object=scaled_object("False", "ScaledObjectCheckFailed", "bad trigger"))
    assert (cond(bad, "AutoscalerReady")["status"], cond(bad, "AutoscalerReady")["reason"]) == (
        "False", "ScaledObjectCheckFailed")
    no_metric = compute_status(ISVC, keda_spec(1), None, deployment(), hpa("False", "FailedGetExternalMetric", "x"),
                               T0, scaled_object=scaled_object())
    verdict = cond(no_metric, "AutoscalerReady")
    assert (verdict["status"], verdict["reason"]) == ("False", "FailedGetExternalMetric")
    assert "external.metrics.k8s.io" in verdict["message"]
    good = compute_status(ISVC, keda_spec(1), None, deployment(), hpa(), T0, scaled_object=scaled_object(),
                          router=router())
    assert cond(good, "Ready")["status"] == "True"


def test_scaled_to_zero_is_ready_not_an_error():
    zero = deployment(ready=0, desired=0)
    st = compute_status(ISVC, keda_spec(0), None, zero, hpa("False", "ScalingDisabled", "scaling is disabled"),
                        T0, scaled_object=scaled_object())
    assert (cond(st, "AutoscalerReady")["status"], cond(st, "AutoscalerReady")["reason"]) == ("True", "ScaledToZero")
    assert "the router holds requests" in cond(st, "AutoscalerReady")["message"]
    assert st["replicaSummary"] == "0/0"


def test_polled_model_state_drives_models_ready_and_the_summary():
    polled = [{"name": "chat", "state": "Loaded", "readyPods": 2, "loadedPods": 2, "failedPods": 0, "message": "x"},
              {"name": "embed", "state": "Failed", "readyPods": 2, "loadedPods": 0, "failedPods": 2,
               "message": "svc-abc-1: no such file /m/e"}]
    st = compute_status(ISVC, spec(), None, deployment(ready=2, desired=2), hpa(), T0, models=polled)
    assert st["models"] == polled
    assert st["modelSummary"] == "chat 2/2, embed 0/2"
    ready = cond(st, "ModelsReady")
    assert (ready["status"], ready["reason"]) == ("False", "ModelLoadFailed")
    assert "embed: svc-abc-1: no such file /m/e" in ready["message"]


def test_without_polling_the_summary_follows_readiness():
    st = compute_status(ISVC, spec(), None, deployment(ready=1), hpa(), T0)
    assert st["modelSummary"] == "chat 1/1, embed 0/1"


def test_router_mode_is_not_ready_without_an_available_router():
    missing = compute_status(ISVC, spec(), None, deployment(), hpa(), T0)
    assert (cond(missing, "RouterReady")["status"], cond(missing, "RouterReady")["reason"]) == ("False", "RouterMissing")
    assert cond(missing, "Ready")["reason"] == "RouterMissing"
    down = compute_status(ISVC, spec(), None, deployment(), hpa(), T0, router=router(ready=0))
    assert (cond(down, "Ready")["status"], cond(down, "Ready")["reason"]) == ("False", "MinimumReplicasUnavailable")
    assert cond(down, "DeploymentAvailable")["status"] == "True"
    assert down["routerSummary"] == "0/2"
    up = compute_status(ISVC, spec(), None, deployment(), hpa(), T0, router=router(ready=1, desired=2))
    assert cond(up, "RouterReady")["status"] == "True" and "1 router pod(s) ready" in cond(up, "RouterReady")["message"]
    assert cond(up, "Ready")["status"] == "True"


def test_service_mode_router_ready_says_service_mode():
    service = parse_spec({"models": MODELS, "routing": {"mode": "service"}}, "svc")
    st = compute_status(ISVC, service, None, deployment(), hpa(), T0)
    assert (cond(st, "RouterReady")["status"], cond(st, "RouterReady")["reason"]) == ("True", "ServiceMode")
    assert cond(st, "Ready")["status"] == "True"
    assert st["routerSummary"] == "service"
    zero = compute_status(ISVC, parse_spec({"models": MODELS, "routing": {"mode": "service"},
                                            "scaling": {"autoscaler": "keda", "minReplicas": 0}}, "svc"),
                          None, deployment(ready=0, desired=0), hpa("False", "ScalingDisabled", "x"), T0,
                          scaled_object=scaled_object())
    assert "the activator answers requests with 503" in cond(zero, "AutoscalerReady")["message"]
