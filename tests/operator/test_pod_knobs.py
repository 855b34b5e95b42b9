"""The serving pod's knobs (spec.env, volumes, shmSize, ...) and scaling.autoscaler none + spec.replicas."""

from __future__ import annotations

import datetime as dt

import kubernetes_validate
import pytest
from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.render import render_children
from kubeinfer_operator.render_base import Owner, selector_labels
from kubeinfer_operator.spec import InvalidSpecError, parse_spec
from kubeinfer_operator.status import AUTOSCALER_READY, compute_status

OWNER = Owner(name="chat", namespace="team-a", uid="0b7a3d4e-0000-4000-8000-000000000010")
CONFIG = OperatorConfig.from_env({"KUBEINFER_IMAGE_PULL_SECRETS": "chart-pull, shared"})
MODEL = {"name": "tiny", "source": "file:///opt/kubeinfer/models/tiny-llama"}
KNOBS = {
    "models": [MODEL],
    "serviceAccountName": "llm-reader",
    "env": [{"name": "HF_HUB_OFFLINE", "value": "0"}, {"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}],
    "envFrom": [{"configMapRef": {"name": "tuning"}}],
    "podAnnotations": {"team": "search", "prometheus.io/port": "9999"},
    "podLabels": {"cost-center": "42", "app.kubernetes.io/component": "mine"},
    "runtimeClassName": "nvidia",
    "priorityClassName": "inference-high",
    "imagePullSecrets": [{"name": "team-pull"}, {"name": "shared"}],
    "volumes": [{"name": "prompts", "configMap": {"name": "prompts"}}],
    "volumeMounts": [{"name": "prompts", "mountPath": "/etc/prompts", "readOnly": True}],
    "shmSize": "8Gi",
}


def _deployment(spec: dict, config: OperatorConfig = CONFIG) -> dict:
    return render_children(OWNER, parse_spec(spec, OWNER.name), config).deployment


def _pod(spec: dict) -> dict:
    return _deployment(spec)["spec"]["template"]


def test_pod_knobs_reach_the_serving_pod():
    template = _pod(KNOBS)
    pod = template["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == "llm-reader" and pod["automountServiceAccountToken"] is False
    assert (pod["runtimeClassName"], pod["priorityClassName"]) == ("nvidia", "inference-high")
    # the chart's secrets first, then the isvc's, each once
    assert pod["imagePullSecrets"] == [{"name": "chart-pull"}, {"name": "shared"}, {"name": "team-pull"}]
    env = {e["name"]: e for e in container["env"]}
    assert [e["name"] for e in container["env"]].count("HF_HUB_OFFLINE") == 1
    assert env["HF_HUB_OFFLINE"]["value"] == "0"  # the isvc's value replaces the operator's
    assert env["NCCL_DEBUG"]["value"] == "INFO" and env["TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert container["envFrom"] == [{"configMapRef": {"name": "tuning"}}]
    assert {"name": "prompts", "configMap": {"name": "prompts"}} in pod["volumes"]
    assert {"name": "prompts", "mountPath": "/etc/prompts", "readOnly": True} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_the_operators_labels_and_annotations_win():
    template = _pod(KNOBS)
    labels, annotations = template["metadata"]["labels"], template["metadata"]["annotations"]
    assert labels["cost-center"] == "42" and annotations["team"] == "search"
    assert labels["app.kubernetes.io/component"] == "serving"  # the selector still matches the pods
    assert selector_labels(OWNER.name).items() <= labels.items()
    assert annotations["prometheus.io/port"] == "8000"


def test_no_knobs_no_extra_fields():
    pod = _pod({"models": [MODEL]})["spec"]
    for key in ("serviceAccountName", "runtimeClassName", "priorityClassName"):
        assert key not in pod
    assert "imagePullSecrets" in pod  # the operator's defaults alone
    assert "imagePullSecrets" not in _deployment({"models": [MODEL]}, OperatorConfig())["spec"]["template"]["spec"]
    assert not any(v["name"] == "dshm" for v in pod["volumes"])


def test_router_and_activator_pods_get_the_operators_pull_secrets():
    kids = render_children(OWNER, parse_spec({"models": [MODEL]}, OWNER.name), CONFIG)
    router = kids.get("Deployment", "chat-router")
    assert router["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "chart-pull"}, {"name": "shared"}]


def test_the_deployment_with_every_knob_validates_strictly():
    kubernetes_validate.validate(_deployment(KNOBS), "1.34.0", strict=True)  # raises on an invalid field


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"volumes": [{"name": "cache-x", "emptyDir": {}}]}, "reserved"),
        ({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, "names no entry of spec.volumes"),
        ({"volumeMounts": [{"name": "prompts", "mountPath": "relative"}], "volumes": [{"name": "prompts"}]},
         "absolute mountPath"),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "repeated: A"),
        ({"shmSize": "lots"}, "shmSize 'lots'"),
        ({"replicas": 3}, "replicas (kubectl scale) applies to scaling.autoscaler: none only"),
    ],
)
def test_bad_knobs_are_invalid_spec(patch, fragment):
    with pytest.raises(InvalidSpecError) as err:
        parse_spec({"models": [MODEL], **patch}, "chat")
    assert fragment in str(err.value)


def test_autoscaler_none_renders_fixed_replicas_and_no_autoscaler():
    kids = render_children(OWNER, parse_spec({"models": [MODEL], "replicas": 3, "scaling": {"autoscaler": "none"}},
                                             OWNER.name), CONFIG)
    assert kids.deployment["spec"]["replicas"] == 3
    assert kids.hpa is None and kids.scaled_object is None and kids.autoscaler is None
    assert [o["kind"] for o in kids.in_order()].count("HorizontalPodAutoscaler") == 0
    unset = render_children(OWNER, parse_spec({"models": [MODEL], "scaling": {"autoscaler": "none", "minReplicas": 2,
                                                                             "maxReplicas": 2}}, OWNER.name), CONFIG)
    assert unset.deployment["spec"]["replicas"] == 2  # spec.replicas unset: minReplicas
    zero = render_children(OWNER, parse_spec({"models": [MODEL], "replicas": 0, "scaling": {"autoscaler": "none"}},
                                             OWNER.name), CONFIG)
    assert zero.deployment["spec"]["replicas"] == 0
    assert "replicas" not in _deployment({"models": [MODEL]})["spec"]  # hpa owns it


def test_status_carries_the_scale_selector_and_a_fixed_size_needs_no_autoscaler():
    spec = parse_spec({"models": [MODEL], "replicas": 2, "scaling": {"autoscaler": "none"}}, "chat")
    isvc = {"metadata": {"name": "chat", "namespace": "team-a", "generation": 2}, "spec": {}}
    deployment = {"spec": {"replicas": 2}, "status": {"replicas": 2, "readyReplicas": 1}}
    status = compute_status(isvc, spec, None, deployment, None, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    assert status["selector"] == ("serving.kubeinfer.io/inferenceservice=chat,"
                                  "app.kubernetes.io/component=serving")
    assert status["replicas"] == 2 and status["replicaSummary"] == "1/2"
    (cond,) = [c for c in status["conditions"] if c["type"] == AUTOSCALER_READY]
    assert (cond["status"], cond["reason"]) == ("True", "FixedReplicas")
