"""The CRD, the examples and the plain manifests, checked offline (the API server is the authority;
tests/operator/test_operator_cluster.py checks the same against it)."""

from __future__ import annotations

import copy
import typing
from typing import Any

import jsonschema
import pytest
import yaml
from kubeinfer_operator.spec import (
    InferenceServiceSpec,
    ModelSpec,
    RoutingSpec,
    RuntimeSpec,
    ScalingSpec,
    parse_spec,
)
from pydantic import BaseModel

from tests.operator.conftest import CRD_PATH, EXAMPLES, REPO, load_yaml_docs


def to_jsonschema(node: Any) -> Any:
    """Map a structural CRD schema to JSON Schema draft 4: int-or-string becomes anyOf, and objects
    with listed properties reject unknown keys (the API server would prune them, or with
    kubectl's default strict field validation, refuse them)."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="module")
def version(crd) -> dict:
    (v,) = crd["spec"]["versions"]
    return v


@pytest.fixture(scope="module")
def validator(version) -> jsonschema.Draft4Validator:
    schema = to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def test_crd_identity(crd, version):
    assert crd["metadata"]["name"] == "inferenceservices.serving.kubeinfer.io"
    assert crd["spec"]["group"] == "serving.kubeinfer.io"
    names = crd["spec"]["names"]
    # isvc is KServe's short name too: kisvc never clashes, and the category lists both kinds of ours
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "InferenceService", "inferenceservices", ["isvc", "kisvc"], ["kubeinfer"])
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}


def _undescribed(node: dict, path: str) -> list[str]:
    out = []
    for key, child in (node.get("properties") or {}).items():
        if "description" not in child and f"{path}.{key}" != ".metadata":  # the API server forbids one there
            out.append(f"{path}.{key}")
        out += _undescribed(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += _undescribed(node["items"], f"{path}[]")
    return out


def test_every_field_is_described_for_kubectl_explain(version):
    assert _undescribed(version["schema"]["openAPIV3Schema"], "") == []


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``M``, ``M | None``, ``list[M]``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _sub_model(arg)
        if found is not None:
            return found
    return None


def _mismatches(model: type[BaseModel], node: dict, path: str) -> list[str]:
    """Fields of ``model`` (by alias) missing from the CRD ``node``'s properties and the reverse,
    recursing into nested models: the spec model and the CRD describe the same object."""
    crd = node.get("properties") or {}
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    out = [f"{path}.{k}: in the spec model, not in the CRD" for k in sorted(set(fields) - set(crd))]
    out += [f"{path}.{k}: in the CRD, not in the spec model" for k in sorted(set(crd) - set(fields))]
    for key in sorted(set(fields) & set(crd)):
        sub = _sub_model(fields[key].annotation)
        if sub is not None:
            child = crd[key]
            out += _mismatches(sub, child.get("items", child), f"{path}.{key}")
    return out


def test_crd_spec_schema_and_the_spec_model_have_the_same_fields(version):
    # adding a field means: the spec model (spec.py), one renderer, and the CRD; this keeps the two
    # descriptions of the spec from drifting apart
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert _mismatches(InferenceServiceSpec, spec, "spec") == []


def test_printer_columns(version):
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(cols) == ["URL", "Ready", "Reason", "Replicas", "Router", "Models", "Age"]
    assert cols["Router"] == ".status.routerSummary"
    assert cols["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert cols["Age"] == ".metadata.creationTimestamp"


def test_cel_rules_cover_the_contract(version):
    text = yaml.safe_dump(version["schema"])
    for fragment in ("self.minReplicas <= self.maxReplicas", "exists_one", "pvc://", "file:///", "hf://",
                     "size(self.models) >= 1", "!has(self.kvCacheBytes) || !has(self.kvCacheFraction)",
                     "!has(self.enforceEager) || !has(self.kind)", "!has(self.quantization)"):
        assert fragment in text


def test_examples_exist_and_first_needs_no_cluster_extras(examples):
    assert len(examples) >= 3
    first = examples[sorted(examples)[0]]
    spec = parse_spec(first["spec"], first["metadata"]["name"])
    assert all(m.parsed_source.scheme == "file" for m in spec.models)  # nothing to download or mount
    assert not any("gpu" in r for r in spec.resources.limits)  # schedulable on any node
    assert spec.scaling.min_replicas == spec.scaling.max_replicas  # Ready without a metrics adapter


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd_schema(path, validator):
    docs = [d for d in load_yaml_docs(path) if d.get("kind") == "InferenceService"]
    assert docs, f"{path.name} holds no InferenceService"
    for doc in docs:
        assert doc["apiVersion"] == "serving.kubeinfer.io/v1alpha1"
        errors = sorted(validator.iter_errors(doc), key=str)
        assert not errors, [e.message for e in errors]
        parse_spec(doc["spec"], doc["metadata"]["name"])


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s["models"][0].update(dtype="int4"), "int4"),
        (lambda s: s["models"][0].update(kind="rerank"), "rerank"),
        (lambda s: s.setdefault("scaling", {}).update(minReplicas=-1), "-1"),
        (lambda s: s.setdefault("scaling", {}).update(autoscaler="vpa"), "vpa"),
        (lambda s: s.setdefault("scaling", {}).update(prometheusAddress="prometheus:9090"), "prometheus:9090"),
        (lambda s: s.setdefault("runtime", {}).update(gpuMemoryUtilization=0), "0"),
        (lambda s: s.setdefault("runtime", {}).update(gpuMemoryUtilization=1.5), "1.5"),
        (lambda s: s.setdefault("resources", {}).update(limits={"memory": "lots"}), "lots"),
        (lambda s: s.setdefault("scaling", {}).update(maxReplica=3), "maxReplica"),
        (lambda s: s["models"][0].update(kvCacheFraction=0), "0"),
        (lambda s: s["models"][0].update(kvCacheFraction=1.2), "1.2"),
        (lambda s: s["models"][0].update(kvCacheBytes=0), "0"),
        (lambda s: s["models"][0].update(kvCacheBytes="1Gi"), "1Gi"),
        (lambda s: s["models"][0].update(enforceEager="yes"), "yes"),
        (lambda s: s.setdefault("runtime", {}).update(enforceEager=1), "1"),
        (lambda s: s.setdefault("routing", {}).update(mode="mesh"), "mesh"),
        (lambda s: s.setdefault("routing", {}).update(loadFactor=0.5), "0.5"),
        (lambda s: s.setdefault("routing", {}).update(replicas=0), "0"),
        (lambda s: s.setdefault("routing", {}).update(holdTimeoutSeconds=-1), "-1"),
        (lambda s: s.setdefault("routing", {}).update(resources={"limits": {"memory": "lots"}}), "lots"),
        (lambda s: s.setdefault("routing", {}).update(strategy="random"), "strategy"),
        (lambda s: s["models"][0].update(quantization="int4"), "int4"),
    ],
)
def test_schema_rejects_out_of_bounds_values(examples, validator, mutate, fragment):
    doc = copy.deepcopy(examples[sorted(examples)[0]])
    mutate(doc["spec"])
    errors = list(validator.iter_errors(doc))
    assert errors and any(fragment in e.message for e in errors)


def _defaults(node: dict) -> dict[str, Any]:
    return {k: v["default"] for k, v in node["properties"].items() if "default" in v}


@pytest.mark.parametrize(
    ("path", "model"),
    [
        (("models", "items"), ModelSpec),
        (("runtime",), RuntimeSpec),
        (("scaling",), ScalingSpec),
        (("routing",), RoutingSpec),
    ],
)
def test_crd_defaults_match_the_operator(version, path, model):
    node = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    node = node[path[0]]
    for part in path[1:]:
        node = node[part]
    by_alias = {(f.alias or name): f.default for name, f in model.model_fields.items()}
    for key, default in _defaults(node).items():
        assert by_alias[key] == default, key


def test_helm_chart_ships_the_same_crd_bytes():
    chart_crds = sorted((REPO / "deploy" / "helm" / "kubeinfer" / "crds").iterdir())
    assert [p.name for p in chart_crds] == [CRD_PATH.name]
    assert chart_crds[0].read_bytes() == CRD_PATH.read_bytes()


def _rules(docs: list[dict]) -> list[dict]:
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    return role["rules"]


def test_plain_rbac_is_least_privilege():
    rules = _rules(load_yaml_docs(REPO / "deploy" / "operator" / "rbac.yaml"))
    resources = {r for rule in rules for r in rule["resources"]}
    assert resources == {"inferenceservices", "inferenceservices/status", "configmaps", "services", "deployments",
                         "horizontalpodautoscalers", "scaledobjects", "pods", "events", "serviceaccounts", "roles",
                         "rolebindings", "endpointslices"}
    verbs = {v for rule in rules for v in rule["verbs"]}
    assert verbs <= {"get", "list", "watch", "patch", "create", "delete"}
    for rule in rules:
        if "delete" in rule["verbs"]:  # the autoscaler / router objects of the mode an isvc left; an activator
            assert set(rule["resources"]) <= {"horizontalpodautoscalers", "scaledobjects", "deployments", "services",
                                              "serviceaccounts", "roles", "rolebindings"}
        if "pods" in rule["resources"]:  # read-only: pod IPs for the model-state poll
            assert rule["verbs"] == ["list", "watch"]
        if "endpointslices" in rule["resources"]:  # read-only: only so the router's Role may grant it
            assert rule["verbs"] == ["get", "list", "watch"]
        if {"roles", "rolebindings"} & set(rule["resources"]):
            assert "bind" not in rule["verbs"] and "escalate" not in rule["verbs"]
    assert "*" not in yaml.safe_dump(rules)
    for rule in rules:
        if "events" in rule["resources"]:
            assert rule["verbs"] == ["create"]
        if "inferenceservices/status" in rule["resources"]:
            assert rule["verbs"] == ["patch"]


def test_helm_rbac_rules_equal_plain_rbac():
    text = (REPO / "deploy" / "helm" / "kubeinfer" / "templates" / "rbac.yaml").read_text()
    role_part = text.split("---", 1)[0]  # the ClusterRole document; templating is only in its labels
    helm_rules = yaml.safe_load("rules:" + role_part.split("rules:", 1)[1])["rules"]
    assert helm_rules == _rules(load_yaml_docs(REPO / "deploy" / "operator" / "rbac.yaml"))


def test_operator_pod_runs_as_the_user_the_operator_image_creates():
    # kopf calls getpass.getuser(): a uid without a passwd entry in the image crashes the operator
    # at start-up (found when the chart first ran the image on a real node).
    import re

    dockerfile = (REPO / "operator" / "Dockerfile").read_text()
    image_uid = int(re.search(r"^ARG OPERATOR_UID=(\d+)$", dockerfile, flags=re.M).group(1))
    assert re.search(r'useradd --uid "\$OPERATOR_UID"', dockerfile)
    assert re.search(r"^USER \$\{OPERATOR_UID\}:\$\{OPERATOR_UID\}$", dockerfile, flags=re.M)
    chart = yaml.safe_load((REPO / "deploy" / "helm" / "kubeinfer" / "values.yaml").read_text())["podSecurityContext"]
    assert chart["runAsUser"] == chart["runAsGroup"] == image_uid
    (plain,) = [d for d in load_yaml_docs(REPO / "deploy" / "operator" / "deployment.yaml") if d["kind"] == "Deployment"]
    pod = plain["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsUser"] == pod["runAsGroup"] == image_uid
