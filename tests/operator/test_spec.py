"""spec.py: what the operator accepts, what it turns into InvalidSpec, and the message a user reads."""

from __future__ import annotations

import pytest
from kubeinfer_operator.spec import InvalidSpecError, parse_model_source, parse_spec

MODEL = {"name": "tiny", "source": "file:///opt/kubeinfer/models/tiny-llama"}


def test_defaults_match_the_crd():
    spec = parse_spec({"models": [MODEL]}, "svc")
    assert spec.models[0].preload is False
    assert spec.models[0].dtype == "auto"
    assert spec.models[0].kind == "generate"
    assert spec.runtime.gpu_memory_utilization == 0.9
    assert (spec.runtime.max_num_seqs, spec.runtime.max_num_batched_tokens) == (256, 8192)
    assert (spec.scaling.min_replicas, spec.scaling.max_replicas) == (1, 1)
    assert spec.scaling.target_queue_length == 8
    assert spec.scaling.scale_down_stabilization_seconds == 300
    assert spec.max_loaded_models == 1  # unset: every model may be resident


@pytest.mark.parametrize(
    ("uri", "scheme", "claim", "local"),
    [
        ("pvc://model-store/llama/3b", "pvc", "model-store", "/mnt/models/model-store/llama/3b"),
        ("file:///opt/models/x", "file", None, "/opt/models/x"),
        ("hf://org/name", "hf", None, None),
    ],
)
def test_source_parsing(uri, scheme, claim, local):
    src = parse_model_source(uri)
    assert (src.scheme, src.claim, src.local_path()) == (scheme, claim, local)


@pytest.mark.parametrize(
    ("spec", "name", "fragment"),
    [
        ({"models": []}, "svc", "at least one model"),
        ({"models": [MODEL, MODEL]}, "svc", "appears more than once"),
        ({"models": [{**MODEL, "name": "Bad_Name"}]}, "svc", "DNS-1123"),
        ({"models": [{**MODEL, "source": "gs://bucket/x"}]}, "svc", "must be pvc://CLAIM/PATH"),
        ({"models": [{**MODEL, "source": "pvc://claim"}]}, "svc", "pvc://CLAIM/PATH"),
        ({"models": [MODEL], "scaling": {"minReplicas": 3, "maxReplicas": 2}}, "svc", "minReplicas (3)"),
        ({"models": [MODEL], "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}, "svc",
         "requests[cpu] (2) exceeds limits[cpu] (1)"),
        ({"models": [MODEL], "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}}},
         "svc", "cannot be overcommitted"),
        ({"models": [MODEL], "resources": {"limits": {"memory": "lots"}}}, "svc", "not a Kubernetes quantity"),
        ({"models": [{**MODEL, "preload": True}, {**MODEL, "name": "b", "preload": True}],
          "runtime": {"maxLoadedModels": 1}}, "svc", "maxLoadedModels is 1"),
        ({"models": [MODEL]}, "9lives", "DNS-1035"),
        ({"models": [{**MODEL, "kvCacheBytes": 1 << 30, "kvCacheFraction": 0.5}]}, "svc",
         "kvCacheBytes or kvCacheFraction, not both"),
        ({"models": [{**MODEL, "kvCacheFraction": 1.5}]}, "svc", "kvCacheFraction"),
        ({"models": [{**MODEL, "kvCacheFraction": 0}]}, "svc", "kvCacheFraction"),
        ({"models": [{**MODEL, "kind": "embed", "kvCacheBytes": 1 << 20}]}, "svc", "kind generate only"),
    ],
)
def test_invalid_specs_name_the_problem(spec, name, fragment):
    with pytest.raises(InvalidSpecError) as err:
        parse_spec(spec, name)
    assert fragment in str(err.value)


def test_error_message_locates_the_field():
    with pytest.raises(InvalidSpecError) as err:
        parse_spec({"models": [MODEL, {"name": "x", "source": "ftp://a/b"}]}, "svc")
    assert str(err.value).startswith("spec.models[1].source:")


def test_claims_are_distinct_in_first_use_order():
    spec = parse_spec(
        {"models": [
            {"name": "a", "source": "pvc://store-b/a"},
            {"name": "b", "source": "pvc://store-a/b"},
            {"name": "c", "source": "pvc://store-b/c"},
            {"name": "d", "source": "hf://o/n"},
        ]},
        "svc",
    )
    assert spec.claims() == ["store-b", "store-a"]


def test_scale_to_zero_needs_keda():
    with pytest.raises(InvalidSpecError, match="minReplicas 0 .* needs autoscaler: keda"):
        parse_spec({"models": [MODEL], "scaling": {"minReplicas": 0, "maxReplicas": 2}}, "svc")
    spec = parse_spec({"models": [MODEL], "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2,
                                                      "activationQueueLength": 2}}, "svc")
    assert (spec.scaling.autoscaler, spec.scaling.min_replicas, spec.scaling.activation_queue_length) == ("keda", 0, 2)


def test_prometheus_address_must_be_a_url():
    with pytest.raises(InvalidSpecError, match="prometheusAddress"):
        parse_spec({"models": [MODEL], "scaling": {"autoscaler": "keda", "prometheusAddress": "prom:9090"}}, "svc")
