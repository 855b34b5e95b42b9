"""Rendering of remote sources: the disk-tier volume, the credentials Secrets as env, the catalogue keys."""

from __future__ import annotations

import yaml
from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.render import render_children
from kubeinfer_operator.render_base import Owner
from kubeinfer_operator.render_catalogue import MODEL_CACHE_DIR
from kubeinfer_operator.spec import parse_spec
from kubeinfer_serving.registry.catalogue import parse_catalogue

OWNER = Owner(name="emb", namespace="team-a", uid="0b7a3d4e-0000-4000-8000-000000000002")
CONFIG = OperatorConfig(serving_image="registry.local/kubeinfer-serving:test")


def _render(spec: dict):
    children = render_children(OWNER, parse_spec(spec, OWNER.name), CONFIG)
    pod = children.deployment["spec"]["template"]["spec"]
    catalogue = yaml.safe_load(children.configmap["data"]["models.yaml"])
    return pod, catalogue


def test_remote_models_get_a_bounded_cache_volume_and_secret_env_never_values():
    pod, catalogue = _render({
        "credentialsSecret": "pod-creds",
        "modelCache": {"size": "10Gi"},
        "models": [
            {"name": "a", "source": "s3://models/a", "credentialsSecret": "store-a"},
            {"name": "b", "source": "hf://org/b@v1.0", "credentialsSecret": "hub"},
            {"name": "c", "source": "s3://models/c", "credentialsSecret": "store-a"},
            {"name": "d", "source": "file:///opt/m/d"},
        ],
    })
    volume = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert volume == {"name": "model-cache", "emptyDir": {"sizeLimit": "10Gi"}}
    container = pod["containers"][0]
    assert {"name": "model-cache", "mountPath": MODEL_CACHE_DIR} in container["volumeMounts"]
    assert container["envFrom"] == [
        {"secretRef": {"name": "pod-creds"}},
        {"prefix": "KUBEINFER_SECRET_0_", "secretRef": {"name": "store-a"}},
        {"prefix": "KUBEINFER_SECRET_1_", "secretRef": {"name": "hub"}},
    ]
    assert catalogue["diskCacheDir"] == MODEL_CACHE_DIR
    assert catalogue["diskCacheBytes"] == int(10 * 1024**3 * 0.95)
    prefixes = {m["name"]: m.get("credentialsEnvPrefix") for m in catalogue["models"]}
    assert prefixes == {"a": "KUBEINFER_SECRET_0_", "b": "KUBEINFER_SECRET_1_", "c": "KUBEINFER_SECRET_0_", "d": None}
    assert parse_catalogue(catalogue).entry("b").parsed_source.revision == "v1.0"  # the pod accepts what we render
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "0"


def test_cache_on_a_claim_and_no_cache_without_remote_models():
    pod, _ = _render({"modelCache": {"claimName": "model-cache-pvc"}, "models": [{"name": "a", "source": "s3://models/a"}]})
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache-pvc"}} in pod["volumes"]
    pod, catalogue = _render({"models": [{"name": "a", "source": "file:///opt/m/a"}]})
    assert all(v["name"] != "model-cache" for v in pod["volumes"])
    assert "envFrom" not in pod["containers"][0] and "diskCacheDir" not in catalogue
