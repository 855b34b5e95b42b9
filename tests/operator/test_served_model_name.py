"""servedModelName: the OpenAI id clients send, apart from the DNS-safe ``name`` Kubernetes objects use."""

from __future__ import annotations

import re

import pytest
import yaml
from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.models_poll import PodModels, summarise
from kubeinfer_operator.render import render_children
from kubeinfer_operator.render_base import Owner
from kubeinfer_operator.spec import SERVED_NAME_PATTERN, InvalidSpecError, parse_spec
from kubeinfer_router.keys import routing_key
from kubeinfer_serving.registry import catalogue as serving_catalogue

OWNER = Owner(name="chat", namespace="team-a", uid="0b7a3d4e-0000-4000-8000-000000000009")
LLAMA = {"name": "llama-1b", "servedModelName": "meta-llama/Llama-3.2-1B-Instruct",
         "source": "file:///opt/kubeinfer/models/tiny-llama", "preload": True,
         "adapters": [{"name": "sql", "servedModelName": "acme/Llama-3.2-1B-sql", "source": "file:///opt/a/sql"}]}
QWEN = {"name": "qwen", "source": "file:///opt/kubeinfer/models/tiny-llama"}


def _catalogue(spec: dict) -> dict:
    kids = render_children(OWNER, parse_spec(spec, OWNER.name), OperatorConfig())
    return yaml.safe_load(kids.configmap["data"]["models.yaml"])


def test_the_pod_serves_the_served_id_and_name_stays_the_default(tmp_path):
    cat = _catalogue({"models": [LLAMA, QWEN]})
    assert [m["name"] for m in cat["models"]] == ["meta-llama/Llama-3.2-1B-Instruct", "qwen"]
    assert cat["models"][0]["adapters"] == [{"name": "acme/Llama-3.2-1B-sql", "source": "file:///opt/a/sql"}]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cat))
    loaded = serving_catalogue.load_catalogue(path)  # the serving pod accepts it as written
    assert loaded.entry("meta-llama/Llama-3.2-1B-Instruct") is not None
    assert loaded.adapter("acme/Llama-3.2-1B-sql") is not None


def test_the_pattern_is_the_serving_catalogues():
    assert SERVED_NAME_PATTERN == serving_catalogue._NAME_PATTERN


@pytest.mark.parametrize("served", ["meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B", "qwen2.5-7b", "gpt_4o.mini", "qwen2.5:7b", "org/model@v2+int8"])
def test_client_ids_that_are_not_dns_labels_are_accepted(served):
    spec = parse_spec({"models": [{**QWEN, "servedModelName": served}]}, "chat")
    assert (spec.models[0].name, spec.models[0].served_name) == ("qwen", served)


@pytest.mark.parametrize(
    ("models", "fragment"),
    [
        ([{**QWEN, "servedModelName": "x"}, {**QWEN, "name": "other", "servedModelName": "x"}], "'x' appears more"),
        ([{**QWEN, "servedModelName": "llama-1b"}, {**QWEN, "name": "llama-1b"}], "'llama-1b' appears more"),
        ([LLAMA, {**QWEN, "servedModelName": "acme/Llama-3.2-1B-sql"}], "'acme/Llama-3.2-1B-sql' appears more"),
        ([{**QWEN, "servedModelName": "/leading-slash"}], "spec.models[0].servedModelName"),
        ([{**QWEN, "servedModelName": "has space"}], "spec.models[0].servedModelName"),
    ],
)
def test_served_ids_are_unique_among_models_and_adapters(models, fragment):
    with pytest.raises(InvalidSpecError) as err:
        parse_spec({"models": models}, "chat")
    assert fragment in str(err.value)


def test_status_models_are_keyed_by_name_and_read_by_served_id():
    spec = parse_spec({"models": [LLAMA, QWEN]}, "chat")
    answers = [PodModels("chat-1-a", True, {"meta-llama/Llama-3.2-1B-Instruct": ("loaded", ""),
                                            "qwen": ("unloaded", "")})]
    by_name = {m["name"]: m for m in summarise(spec, answers)}
    assert by_name["llama-1b"]["state"] == "Loaded"
    assert by_name["llama-1b"]["servedModelName"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert by_name["qwen"]["state"] == "Pending" and by_name["qwen"]["servedModelName"] == "qwen"


def test_kubernetes_names_and_labels_never_carry_the_served_id():
    kids = render_children(OWNER, parse_spec({"models": [LLAMA]}, OWNER.name), OperatorConfig())
    for obj in kids.in_order():
        meta = obj["metadata"]
        assert "/" not in meta["name"] and "Llama" not in meta["name"]
        assert all(re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", v) for v in meta["labels"].values())


def test_the_router_keys_on_the_served_id_as_sent():
    key = routing_key({"model": "meta-llama/Llama-3.2-1B-Instruct", "prompt": "hi"})
    assert key.model == "meta-llama/Llama-3.2-1B-Instruct"
