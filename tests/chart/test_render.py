"""``helm template`` of the chart: defaults, every knob, the monitoring capability guard and the
strict values schema; every rendered manifest validated kubeconform-style (tests/chart/schemas.py).

helm is the one tests/cluster builds (hence the ``cluster`` mark); no control plane is started.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.chart.chart import (
    CHART,
    EVERY_KNOB,
    MONITORING_API,
    env_of,
    one,
    operator_container,
    render,
    template,
    values_readme,
)
from tests.chart.schemas import validate

pytestmark = pytest.mark.cluster

ALERTS = yaml.safe_load((CHART / "files" / "kubeinfer-alerts.yaml").read_text())
DASHBOARD = json.loads((CHART / "files" / "kubeinfer-dashboard.json").read_text())


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def test_defaults_render_valid_manifests_under_the_release_names():
    docs = render(release="kubeinfer")
    for doc in docs:
        validate(doc)
    assert kinds(docs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    dep = one(docs, "Deployment")
    assert dep["metadata"]["name"] == "kubeinfer-kubeinfer-operator"
    assert one(docs, "ClusterRole")["metadata"]["name"] == "kubeinfer-kubeinfer-operator"
    assert dep["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "kubeinfer-operator",
                                                      "app.kubernetes.io/instance": "kubeinfer"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubeinfer-operator" and "imagePullSecrets" not in pod
    assert "priorityClassName" not in pod
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    container = operator_container(docs)
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["image"] == "ghcr.io/kubeinfer/kubeinfer-operator:0.1.0"
    env = env_of(container)
    assert "KUBEINFER_IMAGE_PULL_SECRETS" not in env
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 8081}
    assert container["args"] == ["--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz",
                                 "--metrics=0.0.0.0:8081"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8081", "prometheus.io/path": "/metrics"}


def test_every_knob_is_covered_by_the_every_knob_values():
    documented = [row.key for row in values_readme().rows((CHART / "values.yaml").read_text())]
    missing = []
    for key in documented:
        node = EVERY_KNOB
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"tests/chart/chart.py EVERY_KNOB does not set {missing}"


def test_every_knob_renders_valid_manifests_that_carry_each_setting():
    docs = render(values=EVERY_KNOB, namespace="platform")
    for doc in docs:
        validate(doc)
    assert kinds(docs) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "Deployment",
                           "PodMonitor", "PodMonitor", "PrometheusRule", "ServiceAccount"]
    # names: fullnameOverride is the prefix; nameOverride names the app label
    dep = one(docs, "Deployment")
    assert dep["metadata"]["name"] == "platform-infer-operator"
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == "platform-infer-operator"
    assert one(docs, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "infer-operator", "namespace": "platform"}]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "infer-operator"
    assert dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "infer-operator"
    # the pod
    meta = dep["spec"]["template"]["metadata"]
    assert meta["labels"] == {"app.kubernetes.io/name": "infer-operator", "app.kubernetes.io/instance": "k",
                              "team": "ml-platform"}
    assert meta["annotations"] == {"example.com/owner": "ml-platform", "prometheus.io/scrape": "false",
                                   "prometheus.io/port": "9090", "prometheus.io/path": "/metrics"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other-regcred"}, {"name": "global-regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["serviceAccountName"] == "infer-operator"
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 70000, "runAsGroup": 65532,
                                      "fsGroup": 70000, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["nodeSelector"] == EVERY_KNOB["nodeSelector"]
    assert pod["tolerations"] == EVERY_KNOB["tolerations"]
    assert pod["affinity"] == EVERY_KNOB["affinity"]
    container = operator_container(docs)
    assert container["image"] == "registry.example.com/ml/kubeinfer-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == EVERY_KNOB["resources"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["args"] == ["--namespace=team-a", "--namespace=team-b", "--liveness=http://0.0.0.0:9081/healthz",
                                 "--metrics=0.0.0.0:9090"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 9081, "metrics": 9090}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    env = env_of(container)
    assert env == {
        "KUBEINFER_SERVING_IMAGE": "registry.example.com/ml/kubeinfer-serving:1.2.3",
        "KUBEINFER_STARTUP_TIMEOUT_SECONDS": "600",
        "KUBEINFER_DRAIN_SECONDS": "30",
        "KUBEINFER_PROMETHEUS_URL": "http://prom.obs:9090",
        "KUBEINFER_ACTIVATOR_IMAGE": "registry.example.com/ml/kubeinfer-operator:1.2.3",
        "KUBEINFER_ROUTER_IMAGE": "registry.example.com/ml/kubeinfer-operator:1.2.3",
        "KUBEINFER_ACTIVATOR_RETRY_AFTER_SECONDS": "9",
        "KUBEINFER_KEDA_POLLING_SECONDS": "5",
        "KUBEINFER_IMAGE_PULL_SECRETS": "regcred,other-regcred,global-regcred",
        "HTTPS_PROXY": "http://proxy:3128",
        "NODE_NAME": {"fieldRef": {"fieldPath": "spec.nodeName"}},
    }
    assert [e["name"] for e in container["env"]][-2:] == ["HTTPS_PROXY", "NODE_NAME"]  # after the chart's own
    # monitoring
    serving = one(docs, "PodMonitor", "-serving")
    assert serving["metadata"]["name"] == "platform-infer-serving"
    assert serving["metadata"]["labels"]["release"] == "kps"
    assert serving["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert serving["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    operator = one(docs, "PodMonitor", "-operator")
    assert operator["spec"]["namespaceSelector"] == {"matchNames": ["platform"]}
    assert operator["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    (endpoint,) = operator["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["name"] == "platform-infer-alerts" and rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"]["groups"] == ALERTS["groups"]
    adapter = one(docs, "ConfigMap", "-prometheus-adapter-rules")
    assert "kubeinfer_queue_length" in adapter["data"]["config.yaml"]
    dash = one(docs, "ConfigMap", "-dashboard")
    assert dash["metadata"]["namespace"] == "grafana"
    assert dash["metadata"]["labels"]["grafana_dashboard_llm"] == "yes"
    assert dash["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(dash["data"]["kubeinfer-serving.json"]) == DASHBOARD


def test_the_operator_scrape_job_is_the_one_its_alerts_select():
    docs = render("--set", "podMonitor.enabled=true", "--set", "monitoringCRDs=true")
    relabel = one(docs, "PodMonitor", "-operator")["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert relabel == [{"action": "replace", "targetLabel": "job", "replacement": "kubeinfer-operator"}]
    (group,) = [g for g in ALERTS["groups"] if g["name"] == "kubeinfer-operator"]
    jobs = {m for r in group["rules"] for m in re.findall(r'job="([^"]+)"', r["expr"])}
    assert jobs == {"kubeinfer-operator"}
    assert {r["alert"] for r in group["rules"]} == {"KubeinferOperatorDown", "KubeinferOperatorReconcilesFailing"}


def test_monitoring_objects_follow_the_api_server_capability():
    on = ("--set", "podMonitor.enabled=true", "--set", "prometheusRule.enabled=true")
    # helm template knows no API server: monitoring.coreos.com/v1 is not there
    assert not {"PodMonitor", "PrometheusRule"} & set(kinds(render(*on)))
    with_api = render(*on, "--api-versions", MONITORING_API)
    assert kinds(with_api).count("PodMonitor") == 2 and "PrometheusRule" in kinds(with_api)
    assert kinds(render(*on, "--set", "monitoringCRDs=true")) == kinds(with_api)
    assert not {"PodMonitor", "PrometheusRule"} & set(kinds(render(*on, "--set", "monitoringCRDs=false",
                                                                   "--api-versions", MONITORING_API)))
    # enabling them is not enough by itself
    assert "PodMonitor" not in kinds(render("--api-versions", MONITORING_API))


def test_operator_alerts_only_come_with_the_operator_scrape():
    rule = one(render("--set", "prometheusRule.enabled=true", "--api-versions", MONITORING_API), "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == [g["name"] for g in ALERTS["groups"]
                                                           if g["name"] != "kubeinfer-operator"]
    assert rule["spec"]["groups"] == [g for g in ALERTS["groups"] if g["name"] != "kubeinfer-operator"]


def test_values_of_a_parent_chart_are_accepted():
    values = {"global": {"imagePullSecrets": ["global-regcred"], "storageClass": "fast", "anything": {"a": [1]}},
              "enabled": True}
    container_env = env_of(operator_container(render(values=values)))
    assert container_env["KUBEINFER_IMAGE_PULL_SECRETS"] == "global-regcred"


@pytest.mark.parametrize(("values", "error"), [
    ({"podAnnotation": {"a": "b"}}, "podAnnotation"),
    ({"imagePullSecrets": [{"name": "Not_A_Name"}]}, "imagePullSecrets"),
    ({"imagePullSecrets": [{"secret": "regcred"}]}, "imagePullSecrets"),
    ({"global": {"imagePullSecrets": [{"name": "UPPER"}]}}, "imagePullSecrets"),
    ({"monitoringCRDs": "maybe"}, "monitoringCRDs"),
    ({"operator": {"metrics": {"port": 0}}}, "port"),
    ({"operator": {"metrics": {"readinessPath": "ready"}}}, "readinessPath"),
    ({"extraEnv": [{"value": "no name"}]}, "extraEnv"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"fullnameOverride": "Has_Underscores"}, "fullnameOverride"),
])
def test_the_values_schema_refuses_what_it_should(values, error):
    result = template(values=values, check=False)
    assert result.returncode != 0 and "schema" in result.stderr and error in result.stderr, result.stderr


def test_kube_version_below_the_charts_is_refused():
    result = template("--kube-version", "1.28.9", check=False)
    assert result.returncode != 0 and "kubeVersion" in result.stderr, result.stderr


def test_an_invalid_manifest_fails_validation():
    # the validator itself: a field the Deployment API lacks, a PodMonitor endpoint field that does not exist
    import jsonschema
    import kubernetes_validate

    docs = render("--set", "podMonitor.enabled=true", "--set", "monitoringCRDs=true")
    dep = one(docs, "Deployment")
    dep["spec"]["template"]["spec"]["imagePullSecret"] = [{"name": "typo"}]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    monitor = one(docs, "PodMonitor", "-operator")
    monitor["spec"]["podMetricsEndpoints"][0]["scrapeInterval"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_lint_is_clean_with_every_knob(tmp_path):
    from tests.chart.chart import helm_binary, kube_version

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(EVERY_KNOB))
    result = subprocess.run([str(helm_binary()), "lint", "--strict", "--kube-version", kube_version(), str(CHART),
                             "--values", str(values)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


def test_an_empty_readiness_path_drops_the_readiness_probe():
    container = operator_container(render("--set", "operator.metrics.readinessPath="))
    assert "readinessProbe" not in container and "livenessProbe" in container
    assert {p["name"] for p in container["ports"]} == {"health", "metrics"}


@pytest.mark.parametrize("key", ["podAnnotations", "podLabels", "extraEnv", "imagePullSecrets", "podSecurityContext",
                                 "securityContext", "nodeSelector", "tolerations", "affinity", "global", "resources"])
def test_a_value_set_to_null_renders(key):
    # Helm drops a key set to null (e.g. to remove a default); the templates must cope
    docs = render("--set", f"{key}=null")
    for doc in docs:
        validate(doc)


def test_name_override_and_long_names():
    docs = render("--set", "nameOverride=infer", "--set", "podMonitor.enabled=true", "--set", "monitoringCRDs=true")
    assert one(docs, "Deployment")["metadata"]["name"] == "k-infer-operator"
    assert one(docs, "PodMonitor", "-serving")["metadata"]["name"] == "k-infer-serving"
    assert one(docs, "Deployment")["metadata"]["labels"]["app.kubernetes.io/name"] == "infer-operator"
    long = "a" * 60
    docs = render("--set", f"fullnameOverride={long}", "--set", "podMonitor.enabled=true", "--set", "monitoringCRDs=true",
                  "--set", "prometheusRule.enabled=true", "--set", "grafanaDashboard.enabled=true")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert len(names) == len(docs) and all(len(n) <= 63 for _, n in names), names
    for kind, component in (("Deployment", "operator"), ("ConfigMap", "dashboard"), ("PodMonitor", "serving")):
        # the prefix gives way, the component stays whole
        assert (kind, f"{long[:62 - len(component)]}-{component}") in names, names
