"""render_router.py and router mode in render.py: what a user finds after applying an isvc with
the default ``routing.mode: router``, and what changes in ``service`` mode."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from kubeinfer_operator.config import OPERATOR_UID, OperatorConfig
from kubeinfer_operator.render import render_children, stale_router_objects
from kubeinfer_operator.render_activator import render_activator, wants_activator
from kubeinfer_operator.render_base import Owner
from kubeinfer_operator.render_router import ROUTER_RESOURCES, router_args
from kubeinfer_operator.spec import parse_spec

from tests.operator.conftest import REPO, load_yaml_docs

OWNER = Owner(name="chat", namespace="team-a", uid="0b7a3d4e-0000-4000-8000-000000000002")
CONFIG = OperatorConfig.from_env({"KUBEINFER_SERVING_IMAGE": "reg/serve:1", "KUBEINFER_ROUTER_IMAGE": "reg/op:7"})
MODELS = [{"name": "a", "source": "file:///opt/kubeinfer/models/tiny-llama"},
          {"name": "b", "source": "hf://org/b"}]


def kids(routing=None, scaling=None, config=CONFIG):
    spec = {"models": MODELS}
    if routing is not None:
        spec["routing"] = routing
    if scaling is not None:
        spec["scaling"] = scaling
    return render_children(OWNER, parse_spec(spec, OWNER.name), config)


def by_kind(children) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in children.in_order()}


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_router_mode_is_the_default_and_renders_the_router_objects_in_apply_order():
    children = kids()
    assert [(o["kind"], o["metadata"]["name"]) for o in children.in_order()] == [
        ("ConfigMap", "chat-models"), ("Service", "chat"), ("Deployment", "chat"),
        ("Service", "chat-pods"), ("ServiceAccount", "chat-router"), ("Role", "chat-router"),
        ("RoleBinding", "chat-router"), ("Deployment", "chat-router"), ("HorizontalPodAutoscaler", "chat")]
    for obj in children.in_order():
        (ref,) = obj["metadata"]["ownerReferences"]  # garbage-collected with the isvc
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("InferenceService", "chat", OWNER.uid, True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubeinfer-operator"


def test_selectors_keep_router_serving_and_activator_pods_apart():
    children = kids(scaling={"autoscaler": "keda", "minReplicas": 0})
    objs = by_kind(children)
    serving, router = objs[("Deployment", "chat")], objs[("Deployment", "chat-router")]
    activator = render_activator(OWNER, parse_spec({"models": MODELS, "routing": {"mode": "service"}}, "chat"), CONFIG)
    pods = {"serving": pod_labels(serving), "router": pod_labels(router), "activator": pod_labels(activator)}
    assert {k: v["app.kubernetes.io/component"] for k, v in pods.items()} == {
        "serving": "serving", "router": "router", "activator": "activator"}
    front = objs[("Service", "chat")]["spec"]["selector"]
    headless = objs[("Service", "chat-pods")]["spec"]["selector"]
    assert [k for k, v in pods.items() if selects(front, v)] == ["router"]  # clients reach the router only
    assert [k for k, v in pods.items() if selects(headless, v)] == ["serving"]  # the router reaches serving pods
    for dep, own in ((serving, "serving"), (router, "router"), (activator, "activator")):
        assert [k for k, v in pods.items() if selects(dep["spec"]["selector"]["matchLabels"], v)] == [own]


def test_headless_service_lists_ready_serving_pods_on_the_http_port():
    svc = by_kind(kids())[("Service", "chat-pods")]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is False
    assert svc["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    front = by_kind(kids())[("Service", "chat")]["spec"]
    assert front["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]


def test_router_rbac_reads_endpointslices_in_its_namespace_only():
    objs = by_kind(kids())
    role, binding, account = (objs[("Role", "chat-router")], objs[("RoleBinding", "chat-router")],
                              objs[("ServiceAccount", "chat-router")])
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-a"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "chat-router"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-router", "namespace": "team-a"}]
    assert account["automountServiceAccountToken"] is False  # only the router pod opts in
    pod = objs[("Deployment", "chat-router")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "chat-router" and pod["automountServiceAccountToken"] is True
    serving = objs[("Deployment", "chat")]["spec"]["template"]["spec"]
    assert serving["automountServiceAccountToken"] is False and "serviceAccountName" not in serving


def test_operator_holds_every_permission_it_grants_the_router():
    # RBAC escalation prevention: the API server refuses a Role granting what its creator lacks.
    (cluster_role,) = [d for d in load_yaml_docs(REPO / "deploy" / "operator" / "rbac.yaml")
                       if d["kind"] == "ClusterRole"]
    for rule in by_kind(kids())[("Role", "chat-router")]["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                held = {v for r in cluster_role["rules"] if group in r["apiGroups"] and resource in r["resources"]
                        for v in r["verbs"]}
                assert set(rule["verbs"]) <= held, (group, resource)


def test_router_deployment_runs_kubeinfer_router_with_the_routing_knobs():
    routing = {"loadFactor": 1.5, "virtualNodes": 64, "prefixChars": 200, "imbalanceMinRequests": 8,
               "imbalanceRatio": 2.5, "holdTimeoutSeconds": 120, "maxHeldRequests": 50, "replicas": 3}
    dep = by_kind(kids(routing))[("Deployment", "chat-router")]
    assert dep["spec"]["replicas"] == 3
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert (c["image"], c["command"]) == ("reg/op:7", ["kubeinfer-router"])
    args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
    assert args == {
        "--host": "0.0.0.0", "--port": "8000", "--kube-service": "chat-pods", "--kube-namespace": "$(POD_NAMESPACE)",
        "--isvc": "chat", "--load-factor": "1.5", "--virtual-nodes": "64", "--prefix-chars": "200",
        "--imbalance-min-requests": "8", "--imbalance-ratio": "2.5", "--hold-timeout-seconds": "120",
        "--max-held-requests": "50", "--timeout-graceful-shutdown": "60"}
    env = {e["name"]: e for e in c["env"]}  # the kubelet expands $(POD_NAMESPACE) only when it is defined
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == OPERATOR_UID


def test_router_defaults_two_replicas_small_resources_and_custom_resources_replace_them():
    dep = by_kind(kids())[("Deployment", "chat-router")]
    assert dep["spec"]["replicas"] == 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == ROUTER_RESOURCES
    args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
    assert (args["--load-factor"], args["--virtual-nodes"], args["--hold-timeout-seconds"]) == ("1.25", "256", "60")
    custom = by_kind(kids({"resources": {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}}))
    (c,) = custom[("Deployment", "chat-router")]["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}


def test_router_image_defaults_to_the_activator_image_then_the_operator_default():
    assert OperatorConfig.from_env({"KUBEINFER_ACTIVATOR_IMAGE": "reg/op:3"}).router_image == "reg/op:3"
    assert OperatorConfig.from_env({}).router_image == OperatorConfig().activator_image


def test_service_mode_has_no_router_and_the_service_selects_serving_and_activator_pods():
    children = kids({"mode": "service"})
    assert children.router == ()
    front = children.service["spec"]["selector"]
    assert front == {"serving.kubeinfer.io/inferenceservice": "chat"}
    assert selects(front, pod_labels(children.deployment))
    spec = parse_spec({"models": MODELS, "routing": {"mode": "service"}}, "chat")
    assert selects(front, pod_labels(render_activator(OWNER, spec, CONFIG)))
    assert stale_router_objects(OWNER, spec) == [
        ("apps/v1", "Deployment", "chat-router"), ("v1", "Service", "chat-pods"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding", "chat-router"),
        ("rbac.authorization.k8s.io/v1", "Role", "chat-router"), ("v1", "ServiceAccount", "chat-router")]
    assert stale_router_objects(OWNER, parse_spec({"models": MODELS}, "chat")) == []


def test_no_activator_in_router_mode_the_router_holds_at_zero():
    zero = {"autoscaler": "keda", "minReplicas": 0}
    router = parse_spec({"models": MODELS, "scaling": zero}, "chat")
    service = parse_spec({"models": MODELS, "scaling": zero, "routing": {"mode": "service"}}, "chat")
    at_zero = {"spec": {"replicas": 0}, "status": {}}
    assert not wants_activator(router, at_zero)
    assert wants_activator(service, at_zero)


def _query(children) -> str:
    return children.scaled_object["spec"]["triggers"][0]["metadata"]["query"]


def test_keda_activation_reads_the_routers_held_requests_in_router_mode():
    query = _query(kids(scaling={"autoscaler": "keda", "minReplicas": 0}))
    assert query == (
        '(sum(kubeinfer_queue_length{namespace="team-a",pod=~"chat-[a-z0-9]+-[a-z0-9]+"}) or vector(0)) + '
        '(sum(kubeinfer_router_held_requests{namespace="team-a",pod=~"chat-router-[a-z0-9]+-[a-z0-9]+"})'
        ' or vector(0))')
    serving_pods, router_pods = re.findall(r'pod=~"([^"]+)"', query)
    assert re.fullmatch(router_pods, "chat-router-6d8f7c9b5-k2x7q")
    assert not re.fullmatch(serving_pods, "chat-router-6d8f7c9b5-k2x7q")  # router pods export no queue
    assert not re.fullmatch(router_pods, "chat-7d9c5b6f4-x2x9k")
    service = _query(kids({"mode": "service"}, scaling={"autoscaler": "keda", "minReplicas": 0}))
    assert "kubeinfer_activator_pending_requests" in service and "router" not in service
    assert "router" not in _query(kids(scaling={"autoscaler": "keda", "minReplicas": 1}))


@pytest.mark.parametrize("mode", ["router", "service"])
def test_every_child_validates_strictly(mode):
    for obj in kids({"mode": mode}).in_order():  # (KEDA's ScaledObject has no schema there)
        kubernetes_validate.validate(obj, "1.34.0", strict=True)


def test_router_args_are_accepted_by_kubeinfer_router():
    config = pytest.importorskip("kubeinfer_router.config")
    spec = parse_spec({"models": MODELS, "routing": {"loadFactor": 1.5, "holdTimeoutSeconds": 90}}, "chat")
    args = [a.replace("$(POD_NAMESPACE)", "team-a") for a in router_args(OWNER, spec)[1:]]
    settings = config.parse_settings(args, env={})
    assert (settings.kube_service, settings.kube_namespace, settings.isvc) == ("chat-pods", "team-a", "chat")
    assert (settings.load_factor, settings.hold_timeout_seconds, settings.port) == (1.5, 90, 8000)
    # the pod's grace period covers the preStop pause and the router's own drain
    pod = by_kind(kids())[("Deployment", "chat-router")]["spec"]["template"]["spec"]
    pause = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + settings.timeout_graceful_shutdown


def test_router_mode_changes_nothing_in_the_serving_deployment():
    router, service = kids(), kids({"mode": "service"})
    assert router.deployment == service.deployment  # switching modes never rolls the serving pods
    assert yaml.safe_load(router.configmap["data"]["models.yaml"]) == yaml.safe_load(
        service.configmap["data"]["models.yaml"])
