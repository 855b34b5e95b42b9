"""spec.models[].adapters: the CRD schema, the operator's checks, and the catalogue the serving pod reads."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from kubeinfer_operator.render_catalogue import render_catalogue
from kubeinfer_operator.spec import InvalidSpecError, parse_spec
from kubeinfer_serving.registry.catalogue import parse_catalogue

from tests.operator.test_crd_schema import to_jsonschema

SPEC = {
    "models": [
        {"name": "llama", "source": "pvc://model-store/llama", "adapters": [
            {"name": "llama-sql", "source": "pvc://adapter-store/sql"},
            {"name": "llama-chat", "source": "s3://adapters/chat"}]},
        {"name": "minilm", "source": "pvc://model-store/minilm", "kind": "embed"},
    ],
    "runtime": {"maxLoras": 2, "maxLoraRank": 32, "enableLora": True},
}


def test_adapters_are_rendered_into_a_catalogue_the_serving_pod_accepts():
    spec = parse_spec(SPEC, "svc")
    out = render_catalogue(spec)
    assert out["models"][0]["adapters"] == [{"name": "llama-sql", "source": "pvc://adapter-store/sql"},
                                            {"name": "llama-chat", "source": "s3://adapters/chat"}]
    assert "adapters" not in out["models"][1]
    assert (out["maxLoras"], out["maxLoraRank"], out["enableLora"]) == (2, 32, True)
    cat = parse_catalogue(yaml.safe_load(yaml.safe_dump(out)))
    assert cat.adapter("llama-chat")[0].name == "llama" and cat.max_loras == 2 and cat.enable_lora
    # An adapter's pvc:// claim is mounted and its s3:// source gets the disk tier, as a model's would.
    assert spec.claims() == ["model-store", "adapter-store"] and spec.remote_models


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s["models"][0]["adapters"].append({"name": "minilm", "source": "s3://bucket-a/b"}),
         "adapter name 'minilm' of model 'llama' is already a model or adapter name"),
        (lambda s: s["models"][0]["adapters"].append({"name": "llama-sql", "source": "s3://bucket-a/b"}),
         "adapter name 'llama-sql'"),
        (lambda s: s["models"][1].update(adapters=[{"name": "x", "source": "s3://bucket-a/b"}]),
         "adapters apply to kind generate only"),
        (lambda s: s["models"][0]["adapters"][0].update(name="Bad_Name"), "DNS-1123"),
        (lambda s: s["models"][0]["adapters"][0].update(source="gs://x/y"), "must be pvc://CLAIM/PATH"),
    ],
)
def test_operator_refuses_bad_adapters(mutate, fragment):
    spec = copy.deepcopy(SPEC)
    mutate(spec)
    with pytest.raises(InvalidSpecError) as err:
        parse_spec(spec, "svc")
    assert fragment in str(err.value)


def test_crd_schema_takes_adapters_and_carries_their_cel_rules(crd):
    (version,) = crd["spec"]["versions"]
    validator = jsonschema.Draft4Validator(to_jsonschema(version["schema"]["openAPIV3Schema"]))
    doc = {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "svc"},
           "spec": copy.deepcopy(SPEC)}
    assert not list(validator.iter_errors(doc))
    doc["spec"]["models"][0]["adapters"][0]["rank"] = 8
    assert any("rank" in e.message for e in validator.iter_errors(doc))
    doc["spec"]["runtime"]["maxLoras"] = 0
    assert any("0" in e.message for e in validator.iter_errors(doc))
    rules = " ".join(_rules(version["schema"]))
    for fragment in ("self.all(a, self.exists_one(b, b.name == a.name))", "!self.models.exists(o, o.name == a.name)",
                     "!has(self.adapters) || !has(self.kind) || self.kind == 'generate'"):
        assert fragment in rules


def _rules(node) -> list[str]:
    """Every CEL rule in a schema node, recursively."""
    if isinstance(node, list):
        return [r for n in node for r in _rules(n)]
    if not isinstance(node, dict):
        return []
    own = [v["rule"] for v in node.get("x-kubernetes-validations", [])]
    return own + [r for k, v in node.items() if k != "x-kubernetes-validations" for r in _rules(v)]
