"""render.py: the child objects a user finds after ``kubectl apply`` of an InferenceService."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubeinfer_operator.config import OPERATOR_UID, SERVING_UID, OperatorConfig
from kubeinfer_operator.render import render_children
from kubeinfer_operator.render_activator import render_activator, wants_activator
from kubeinfer_operator.render_base import Owner, selector_labels
from kubeinfer_operator.render_catalogue import CONFIG_HASH_ANNOTATION
from kubeinfer_operator.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]

OWNER = Owner(name="chat", namespace="team-a", uid="0b7a3d4e-0000-4000-8000-000000000001")
CONFIG = OperatorConfig(serving_image="registry.local/kubeinfer-serving:test", startup_timeout_seconds=900,
                        drain_seconds=60)
SPEC = {
    "models": [
        {"name": "llama-1b", "source": "pvc://model-store/llama-3.2-1b", "preload": True, "dtype": "bfloat16",
         "maxModelLen": 4096},
        {"name": "qwen", "source": "pvc://model-store/qwen"},
        {"name": "minilm", "source": "pvc://embed-store/minilm", "kind": "embed"},
        {"name": "tiny", "source": "file:///opt/kubeinfer/models/tiny-llama"},
    ],
    "runtime": {"maxLoadedModels": 2, "gpuMemoryUtilization": 0.8, "maxNumSeqs": 64, "maxNumBatchedTokens": 4096,
                "maxWaitingRequests": 32},
    "resources": {"requests": {"cpu": "4", "nvidia.com/gpu": 1}, "limits": {"memory": "32Gi", "nvidia.com/gpu": 1}},
    "scaling": {"minReplicas": 2, "maxReplicas": 5, "targetQueueLength": 6, "scaleDownStabilizationSeconds": 120},
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def children(spec=SPEC, config=CONFIG):
    return render_children(OWNER, parse_spec(spec, OWNER.name), config)


def container(kids):
    return kids.deployment["spec"]["template"]["spec"]["containers"][0]


def test_every_child_is_controlled_by_the_isvc_and_labelled():
    for obj in children().in_order():
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a"
        (ref,) = meta["ownerReferences"]
        assert ref == {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService", "name": "chat",
                       "uid": OWNER.uid, "controller": True}
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubeinfer-operator"
        assert meta["labels"]["serving.kubeinfer.io/inferenceservice"] == "chat"


def test_names():
    kids = children()
    assert kids.configmap["metadata"]["name"] == "chat-models"
    assert {kids.deployment["metadata"]["name"], kids.service["metadata"]["name"], kids.hpa["metadata"]["name"]} == {
        "chat"}


def test_deployment_leaves_replicas_to_the_hpa():
    assert "replicas" not in children().deployment["spec"]


def test_serving_container_command_and_catalogue_mount():
    c = container(children())
    assert c["command"] == ["kubeinfer-serve"]
    assert c["args"][:6] == ["--host", "0.0.0.0", "--port", "8000", "--models-config", "/etc/kubeinfer/models.yaml"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/kubeinfer")
    vol = next(v for v in children().deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == "chat-models"
    assert mount["readOnly"] is True


def test_container_args_are_accepted_by_kubeinfer_serve():
    config = pytest.importorskip("kubeinfer_serving.config")
    c = container(children())
    settings = config.parse_settings(c["args"], env={})
    assert settings.port == 8000
    assert str(settings.models_config) == "/etc/kubeinfer/models.yaml"
    assert settings.timeout_graceful_shutdown == CONFIG.drain_seconds


def test_gpu_limits_and_requests_pass_through():
    c = container(children())
    assert c["resources"] == {"limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
                              "requests": {"cpu": "4", "nvidia.com/gpu": "1"}}


def test_probes_cover_model_loading():
    c = container(children())
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= CONFIG.startup_timeout_seconds
    assert children().deployment["spec"]["progressDeadlineSeconds"] > CONFIG.startup_timeout_seconds


def test_prometheus_scrape_annotations():
    ann = children().deployment["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == "8000"
    assert ann["prometheus.io/path"] == "/metrics"


def test_each_claim_mounted_once_read_only_under_mnt_models():
    kids = children()
    pod = kids.deployment["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert sorted(c["claimName"] for c in claims.values()) == ["embed-store", "model-store"]
    assert all(c["readOnly"] for c in claims.values())
    mounts = {m["mountPath"]: m for m in container(kids)["volumeMounts"] if m["name"] in claims}
    assert set(mounts) == {"/mnt/models/model-store", "/mnt/models/embed-store"}
    assert all(m["readOnly"] for m in mounts.values())


def test_no_pvc_for_file_sources():
    kids = children({"models": [{"name": "tiny", "source": "file:///opt/kubeinfer/models/tiny-llama"}]})
    assert not any("persistentVolumeClaim" in v for v in kids.deployment["spec"]["template"]["spec"]["volumes"])


def test_graceful_shutdown_outlasts_prestop_and_drain():
    kids = children()
    pod = kids.deployment["spec"]["template"]["spec"]
    pause = container(kids)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + CONFIG.drain_seconds


def test_security_context_non_root_read_only():
    kids = children()
    pod = kids.deployment["spec"]["template"]["spec"]
    c = container(kids)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert "/tmp" in writable
    assert pod["automountServiceAccountToken"] is False


def test_pod_runs_as_the_user_the_serving_image_creates():
    # serving/Dockerfile creates the user (ARG KUBEINFER_UID) that the pod securityContext names:
    # with another uid, getpass/torch find no passwd entry and the home directory is not writable.
    dockerfile = (REPO / "serving" / "Dockerfile").read_text()
    image_uid = int(re.search(r"^ARG KUBEINFER_UID=(\d+)$", dockerfile, flags=re.M).group(1))
    assert re.search(r"^USER \$\{KUBEINFER_UID\}:\$\{KUBEINFER_UID\}$", dockerfile, flags=re.M)
    pod = children().deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == image_uid
    assert SERVING_UID == image_uid


def test_scheduling_passthrough():
    pod = children().deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == SPEC["nodeSelector"]
    assert pod["tolerations"] == SPEC["tolerations"]


def test_image_default_comes_from_operator_config():
    assert container(children())["image"] == CONFIG.serving_image
    custom = copy.deepcopy(SPEC)
    custom["runtime"]["image"] = "mine:1"
    assert container(children(custom))["image"] == "mine:1"
    assert OperatorConfig.from_env({"KUBEINFER_SERVING_IMAGE": "x:2"}).serving_image == "x:2"


def test_service_port_80_to_http_and_selects_the_pods_in_service_mode():
    kids = children({**SPEC, "routing": {"mode": "service"}})
    svc = kids.service["spec"]
    assert svc["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    pod_labels = kids.deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"] == {"serving.kubeinfer.io/inferenceservice": "chat"}
    assert svc["selector"].items() <= pod_labels.items()
    assert kids.deployment["spec"]["selector"]["matchLabels"] == selector_labels("chat")
    assert selector_labels("chat").items() <= pod_labels.items()
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container(kids)["ports"]


def test_activator_is_selected_by_the_service_but_never_by_the_serving_deployment():
    keda = parse_spec({**SPEC, "scaling": {"autoscaler": "keda", "minReplicas": 0}, "routing": {"mode": "service"}},
                      "chat")
    config = OperatorConfig.from_env({"KUBEINFER_ACTIVATOR_IMAGE": "reg/op:9", "KUBEINFER_ACTIVATOR_RETRY_AFTER_SECONDS": "3"})
    act = render_activator(OWNER, keda, config)
    kids = render_children(OWNER, keda, config)
    pod = act["spec"]["template"]
    assert (act["kind"], act["metadata"]["name"], act["spec"]["replicas"]) == ("Deployment", "chat-activator", 1)
    assert act["metadata"]["ownerReferences"] == kids.service["metadata"]["ownerReferences"]
    assert kids.service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert not kids.deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert not act["spec"]["selector"]["matchLabels"].items() <= (
        kids.deployment["spec"]["template"]["metadata"]["labels"].items())
    assert act["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert (c["image"], c["command"]) == ("reg/op:9", ["kubeinfer-activator"])
    assert "--retry-after=3" in c["args"] and "--isvc=chat" in c["args"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]  # the Service's targetPort
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsUser"] == OPERATOR_UID
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]


def test_operator_uid_matches_the_operator_image():
    dockerfile = (REPO / "operator" / "Dockerfile").read_text()
    assert f"ARG OPERATOR_UID={OPERATOR_UID}" in dockerfile


def test_activator_runs_only_for_keda_min_zero_without_a_ready_serving_pod():
    service = {"mode": "service"}
    zero = parse_spec({**SPEC, "scaling": {"autoscaler": "keda", "minReplicas": 0}, "routing": service}, "chat")
    one = parse_spec({**SPEC, "scaling": {"autoscaler": "keda", "minReplicas": 1}, "routing": service}, "chat")
    hpa = parse_spec(SPEC, "chat")

    def dep(replicas, ready):
        return {"spec": {"replicas": replicas}, "status": {"readyReplicas": ready} if ready is not None else {}}

    assert wants_activator(zero, dep(0, None))  # KEDA scaled it to zero
    assert wants_activator(zero, dep(1, 0))  # activated, the pod is still loading
    assert wants_activator(zero, dep(0, 1))  # scaling to zero: the last pod is terminating
    assert not wants_activator(zero, dep(1, 1))
    assert not wants_activator(zero, None)
    assert not wants_activator(one, dep(1, 0)) and not wants_activator(hpa, dep(0, None))
    assert not wants_activator(None, dep(0, None))


def test_hpa_scales_on_queue_length():
    hpa = children().hpa["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "kubeinfer_queue_length"},
                                                        "target": {"type": "AverageValue", "averageValue": "6"}}}]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120


def test_keda_mode_renders_a_scaled_object_instead_of_an_hpa():
    keda = {**SPEC, "scaling": {**SPEC["scaling"], "autoscaler": "keda", "minReplicas": 0, "activationQueueLength": 1},
            "routing": {"mode": "service"}}  # router mode's query: test_render_router.py
    kids = children(keda)
    assert kids.hpa is None
    so = kids.scaled_object
    assert (so["apiVersion"], so["kind"], so["metadata"]["name"]) == ("keda.sh/v1alpha1", "ScaledObject", "chat")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"], so["spec"]["cooldownPeriod"]) == (0, 5, 120)
    # A new min-0 isvc is not taken to zero before its first pod has had the cooldown to come up.
    assert so["spec"]["initialCooldownPeriod"] == 120
    trigger, in_flight = so["spec"]["triggers"]
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
    meta = trigger["metadata"]
    assert meta["query"] == (
        '(sum(kubeinfer_queue_length{namespace="team-a",pod=~"chat-[a-z0-9]+-[a-z0-9]+"}) or vector(0)) + '
        '(sum(kubeinfer_activator_pending_requests{namespace="team-a",pod=~"chat-activator-[a-z0-9]+-[a-z0-9]+"})'
        ' or vector(0))')
    assert (meta["threshold"], meta["activationThreshold"]) == ("6", "1")
    assert (in_flight["name"], in_flight["metricType"]) == ("in-flight", "AverageValue")
    assert (in_flight["metadata"]["threshold"], in_flight["metadata"]["activationThreshold"]) == ("1", "0")
    assert in_flight["metadata"]["query"].startswith("clamp_max(")
    assert "kubeinfer_num_requests_running" in in_flight["metadata"]["query"]
    one = children({**SPEC, "scaling": {"autoscaler": "keda", "minReplicas": 1}}).scaled_object["spec"]["triggers"]
    assert [t["name"] for t in one] == ["queue-length"]
    assert one[0]["metadata"]["query"] == (
        'sum(kubeinfer_queue_length{namespace="team-a",pod=~"chat-[a-z0-9]+-[a-z0-9]+"})')
    assert meta["serverAddress"] == CONFIG.prometheus_url
    hpa_config = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa_config["name"] == "keda-hpa-chat"
    assert hpa_config["behavior"] == children().hpa["spec"]["behavior"]  # same behaviour in both modes
    assert kids.in_order()[-1] is so


def test_keda_query_matches_only_this_isvcs_pods():
    import re

    pattern = re.search(r'pod=~"([^"]+)"', children({**SPEC, "scaling": {"autoscaler": "keda"}}).scaled_object[
        "spec"]["triggers"][0]["metadata"]["query"]).group(1)
    assert re.fullmatch(pattern, "chat-7d9c5b6f4-x2x9k")
    assert not re.fullmatch(pattern, "chat-large-7d9c5b6f4-x2x9k")  # another isvc named chat-large


def test_keda_prometheus_address_per_isvc():
    kids = children({**SPEC, "scaling": {"autoscaler": "keda", "prometheusAddress": "http://prom.obs:9090"}})
    assert kids.scaled_object["spec"]["triggers"][0]["metadata"]["serverAddress"] == "http://prom.obs:9090"


def test_catalogue_content():
    cat = yaml.safe_load(children().configmap["data"]["models.yaml"])
    assert cat["maxLoadedModels"] == 2
    assert cat["gpuMemoryUtilization"] == 0.8
    assert (cat["maxNumSeqs"], cat["maxNumBatchedTokens"], cat["maxWaitingRequests"]) == (64, 4096, 32)
    assert cat["pvcRoot"] == "/mnt/models"
    assert cat["models"][0] == {"name": "llama-1b", "source": "pvc://model-store/llama-3.2-1b", "kind": "generate",
                                "preload": True, "dtype": "bfloat16", "maxModelLen": 4096}
    assert [m["name"] for m in cat["models"]] == ["llama-1b", "qwen", "minilm", "tiny"]
    assert cat["models"][2]["kind"] == "embed"


def test_catalogue_round_trips_through_the_serving_parser(tmp_path):
    catalogue = pytest.importorskip("kubeinfer_serving.registry.catalogue")
    path = tmp_path / "models.yaml"
    path.write_text(children().configmap["data"]["models.yaml"])
    loaded = catalogue.load_catalogue(path)
    assert [(m.name, m.source, m.kind.value, m.preload) for m in loaded.models] == [
        (m["name"], m["source"], m.get("kind", "generate"), m.get("preload", False)) for m in SPEC["models"]
    ]
    assert loaded.models[0].dtype == "bfloat16" and loaded.models[0].max_model_len == 4096
    assert loaded.max_loaded_models == 2
    assert loaded.gpu_memory_utilization == 0.8
    assert (loaded.max_num_seqs, loaded.max_num_batched_tokens) == (64, 4096)
    assert loaded.pvc_root == "/mnt/models"


def _hash(kids):
    return kids.deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]


def test_catalogue_change_rolls_pods_scaling_change_does_not():
    base = children()
    more = copy.deepcopy(SPEC)
    more["models"].append({"name": "extra", "source": "hf://org/extra"})
    assert _hash(children(more)) != _hash(base)
    scaled = copy.deepcopy(SPEC)
    scaled["scaling"]["maxReplicas"] = 9
    again = children(scaled)
    assert again.deployment == base.deployment
    assert again.hpa["spec"]["maxReplicas"] == 9


def test_rendering_is_deterministic():
    assert children() == children()


@pytest.mark.parametrize("which", ["configmap", "service", "deployment", "hpa"])
def test_children_validate_strictly(which):
    obj = getattr(children(), which)
    kubernetes_validate.validate(obj, "1.34.0", strict=True)


def test_activator_validates_strictly():
    keda = parse_spec({**SPEC, "scaling": {"autoscaler": "keda", "minReplicas": 0}}, "chat")
    kubernetes_validate.validate(render_activator(OWNER, keda, CONFIG), "1.34.0", strict=True)


def test_strict_validation_would_catch_a_bad_field():
    obj = copy.deepcopy(children().deployment)
    obj["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, "1.34.0", strict=True)


def test_examples_render_valid_children(examples):
    for isvc in examples.values():
        kids = render_children(Owner(isvc["metadata"]["name"], "default", OWNER.uid),
                               parse_spec(isvc["spec"], isvc["metadata"]["name"]), CONFIG)
        for obj in kids.in_order():
            kubernetes_validate.validate(obj, "1.34.0", strict=True)



def test_api_keys_secret_is_mounted_and_named_to_the_server(tmp_path):
    from kubeinfer_operator.render_deployment import API_KEYS_DIR, API_KEYS_FILE

    spec = copy.deepcopy(SPEC)
    spec["apiKeysSecret"] = "chat-api-keys"
    kids = children(spec)
    pod = kids.deployment["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert vol["secret"]["secretName"] == "chat-api-keys"
    mount = next(m for m in container(kids)["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True}
    env = {e["name"]: e.get("value") for e in container(kids)["env"]}
    assert env["KUBEINFER_API_KEYS_FILE"] == f"{API_KEYS_DIR}/{API_KEYS_FILE}"
    # The serving pod reads that variable as its --api-keys-file.
    config = pytest.importorskip("kubeinfer_serving.config")
    keys_file = tmp_path / API_KEYS_FILE
    settings = config.ServerSettings.from_sources({}, {"KUBEINFER_API_KEYS_FILE": str(keys_file)})
    assert settings.api_keys_file == keys_file
    # Without the field: no volume, no variable.
    plain = children()
    assert all(v["name"] != "api-keys" for v in plain.deployment["spec"]["template"]["spec"]["volumes"])
    assert "KUBEINFER_API_KEYS_FILE" not in {e["name"] for e in container(plain)["env"]}


def test_idle_timeout_and_scheduling_policy_reach_the_catalogue(tmp_path):
    spec = copy.deepcopy(SPEC)
    spec["runtime"] = {**spec["runtime"], "idleTimeoutSeconds": 1800, "schedulingPolicy": "priority"}
    spec["models"][1] = {**spec["models"][1], "idleTimeoutSeconds": 60, "resultCache": True}
    text = children(spec).configmap["data"]["models.yaml"]
    cat = yaml.safe_load(text)
    assert cat["idleTimeoutSeconds"] == 1800 and cat["schedulingPolicy"] == "priority"
    assert cat["models"][1]["idleTimeoutSeconds"] == 60 and "idleTimeoutSeconds" not in cat["models"][0]
    catalogue = pytest.importorskip("kubeinfer_serving.registry.catalogue")
    path = tmp_path / "models.yaml"
    path.write_text(text)
    loaded = catalogue.load_catalogue(path)
    assert loaded.idle_timeout_seconds == 1800 and loaded.scheduling_policy == "priority"
    assert loaded.models[1].idle_timeout_seconds == 60
    assert loaded.models[1].result_cache and not loaded.models[0].result_cache


def test_kv_cache_sizes_reach_the_catalogue_and_the_serving_parser(tmp_path):
    spec = copy.deepcopy(SPEC)
    spec["models"][0] = {**spec["models"][0], "kvCacheFraction": 0.25}
    spec["models"][1] = {**spec["models"][1], "kvCacheBytes": 1 << 30}
    text = children(spec).configmap["data"]["models.yaml"]
    cat = yaml.safe_load(text)
    assert cat["models"][0]["kvCacheFraction"] == 0.25 and cat["models"][1]["kvCacheBytes"] == 1 << 30
    assert not {"kvCacheBytes", "kvCacheFraction"} & (set(cat["models"][2]) | set(cat["models"][3]))
    catalogue = pytest.importorskip("kubeinfer_serving.registry.catalogue")
    path = tmp_path / "models.yaml"
    path.write_text(text)
    loaded = catalogue.load_catalogue(path)
    assert loaded.kv_request(loaded.models[0]) == (None, 0.25)
    assert loaded.kv_request(loaded.models[1]) == (1 << 30, None)
    assert loaded.kv_request(loaded.models[3]) == (None, None)


def test_enforce_eager_reaches_the_catalogue_pod_wide_and_per_model(tmp_path):
    """runtime.enforceEager is the catalogue's pod-level enforceEager, a model's own overrides it,
    and an unset field stays out of models.yaml (the serving pod's default applies)."""
    catalogue = pytest.importorskip("kubeinfer_serving.registry.catalogue")
    plain = yaml.safe_load(children().configmap["data"]["models.yaml"])
    assert "enforceEager" not in plain and all("enforceEager" not in m for m in plain["models"])
    spec = copy.deepcopy(SPEC)
    spec["runtime"] = {**spec["runtime"], "enforceEager": True}
    spec["models"][0] = {**spec["models"][0], "enforceEager": False}
    text = children(spec).configmap["data"]["models.yaml"]
    cat = yaml.safe_load(text)
    assert cat["enforceEager"] is True and cat["models"][0]["enforceEager"] is False
    assert "enforceEager" not in cat["models"][1]
    path = tmp_path / "models.yaml"
    path.write_text(text)
    loaded = catalogue.load_catalogue(path)
    assert not loaded.enforce_eager_for(loaded.models[0])
    assert loaded.enforce_eager_for(loaded.models[1])
    # A spec changing only enforceEager rolls the pods (the catalogue hash changes).
    assert children(spec).deployment != children().deployment


def test_quantization_reaches_the_catalogue_per_model(tmp_path):
    """A model's spec.quantization is its catalogue entry's quantization; unset ("none") stays out."""
    catalogue = pytest.importorskip("kubeinfer_serving.registry.catalogue")
    plain = yaml.safe_load(children().configmap["data"]["models.yaml"])
    assert all("quantization" not in m for m in plain["models"])
    spec = copy.deepcopy(SPEC)
    spec["models"][0] = {**spec["models"][0], "quantization": "int8"}
    text = children(spec).configmap["data"]["models.yaml"]
    path = tmp_path / "models.yaml"
    path.write_text(text)
    loaded = catalogue.load_catalogue(path)
    assert loaded.models[0].quantization == "int8" and loaded.models[1].quantization == "none"
    with pytest.raises(ValueError, match="quantization applies to kind generate only"):
        parse_spec({**SPEC, "models": [{**SPEC["models"][0], "kind": "embed", "quantization": "fp8"}]}, "x")
