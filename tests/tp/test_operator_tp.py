"""The operator side of tensor parallelism: ``tensorParallelSize`` reaches the pod's catalogue, pods
with a split model get a memory-backed ``/dev/shm``, and sizes that do not divide are refused (the
operator's own check; the CRD carries the same rules in CEL)."""

from __future__ import annotations

import pytest
import yaml
from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.render import Owner, render_children
from kubeinfer_operator.render_catalogue import catalogue_yaml
from kubeinfer_operator.spec import InvalidSpecError, parse_spec
from kubeinfer_serving.registry.catalogue import parse_catalogue

from tests.operator.conftest import CRD_PATH

OWNER = Owner(name="big", namespace="team-a", uid="0b7a3d4e-0000-4000-8000-000000000023")
CONFIG = OperatorConfig(serving_image="registry.local/kubeinfer-serving:test")


def _spec(tp: int, gpus: int | str = 4, **model) -> dict:
    return {"models": [{"name": "llama-70b", "source": "pvc://models/llama-70b", "preload": True,
                        "tensorParallelSize": tp, **model},
                       {"name": "small", "source": "pvc://models/small"}],
            "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}}


def test_the_split_reaches_the_serving_catalogue_and_the_pod_gets_shared_memory():
    spec = parse_spec(_spec(4), OWNER.name)
    catalogue = parse_catalogue(yaml.safe_load(catalogue_yaml(spec)))
    assert [m.tensor_parallel_size for m in catalogue.models] == [4, 1]
    pod = render_children(OWNER, spec, CONFIG).deployment["spec"]["template"]["spec"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_a_pod_without_a_split_model_keeps_the_default_shm_and_shm_size_wins():
    pod = render_children(OWNER, parse_spec(_spec(1), OWNER.name), CONFIG).deployment["spec"]["template"]["spec"]
    assert all(v["name"] != "dshm" for v in pod["volumes"])
    assert "tensorParallelSize" not in catalogue_yaml(parse_spec(_spec(1), OWNER.name))
    spec = parse_spec({**_spec(2), "shmSize": "8Gi"}, OWNER.name)
    pod = render_children(OWNER, spec, CONFIG).deployment["spec"]["template"]["spec"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["sizeLimit"] == "8Gi"


@pytest.mark.parametrize(("spec", "message"), [
    (_spec(3, gpus=4), "tensorParallelSize 3 does not divide the pod's 4 nvidia.com/gpu"),
    (_spec(8, gpus="4"), "tensorParallelSize 8 does not divide the pod's 4 nvidia.com/gpu"),
    (_spec(2, kind="embed"), "tensorParallelSize > 1 applies to kind generate without adapters"),
    (_spec(2, adapters=[{"name": "sql", "source": "s3://adapters/sql"}]),
     "tensorParallelSize > 1 applies to kind generate without adapters"),
])
def test_sizes_that_do_not_fit_are_refused_with_the_numbers(spec, message):
    with pytest.raises(InvalidSpecError, match=message):
        parse_spec(spec, OWNER.name)


def test_the_crd_carries_the_field_and_its_cel_rules():
    crd = yaml.safe_load(CRD_PATH.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = spec["properties"]["models"]["items"]
    assert model["properties"]["tensorParallelSize"]["minimum"] == 1
    assert any("tensorParallelSize" in r["rule"] for r in model["x-kubernetes-validations"])
    assert any("nvidia.com/gpu" in r["rule"] and "tensorParallelSize" in r["rule"]
               for r in spec["x-kubernetes-validations"])


@pytest.mark.cluster
def test_the_api_server_refuses_a_size_that_does_not_divide_the_gpus(cluster):
    applied = cluster.kubectl("apply", "--server-side", "-f", str(CRD_PATH), check=False)
    assert applied.returncode == 0, applied.stderr
    cluster.kubectl("wait", "--for", "condition=Established", "crd/inferenceservices.serving.kubeinfer.io",
                    "--timeout=60s")

    def create(name: str, spec: dict):
        body = {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
                "metadata": {"name": name, "namespace": "default"}, "spec": spec}
        return cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(body), check=False)

    assert create("fits", _spec(2)).returncode == 0
    refused = create("three-of-four", _spec(3))
    assert refused.returncode != 0
    assert "every model's tensorParallelSize must divide resources.limits nvidia.com/gpu" in refused.stderr
    embed = create("embed-split", _spec(2, kind="embed"))
    assert embed.returncode != 0 and "tensorParallelSize > 1 applies to kind generate" in embed.stderr
