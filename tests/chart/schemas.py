"""kubeconform-style offline validation of rendered manifests.

Built-in kinds are checked against Kubernetes' own OpenAPI-derived JSON schemas
(``kubernetes_validate``, strict: unknown fields are errors); prometheus-operator's PodMonitor and
PrometheusRule against the ``openAPIV3Schema`` of their CRDs, made strict the way kubeconform's
``openapi2jsonschema --strict`` does (``additionalProperties: false`` wherever an object lists its
properties). The CRDs come from the prometheus-operator Go module (``example/prometheus-operator-crd``),
downloaded through the Go module proxy into Go's module cache on first use.
"""

from __future__ import annotations

import copy
import json
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.chart.chart import kube_version

#: prometheus-operator release whose CRDs the monitoring objects are checked against.
PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
MONITORING_KINDS = ("PodMonitor", "PrometheusRule")


@cache
def prometheus_operator_crds() -> dict[str, dict]:
    """Kind -> CRD (dict) for ``MONITORING_KINDS``, from the pinned prometheus-operator module.

    Runs ``go mod download -json MODULE`` (a no-op once Go's module cache has it). Raises
    ``subprocess.CalledProcessError`` when the download fails.
    """
    with tempfile.TemporaryDirectory() as outside_any_module:
        out = subprocess.run(["go", "mod", "download", "-json", PROMETHEUS_OPERATOR_MODULE], cwd=outside_any_module,
                             capture_output=True, text=True, timeout=600, check=True).stdout
    crd_dir = Path(json.loads(out)["Dir"]) / "example" / "prometheus-operator-crd"
    crds = {}
    for kind in MONITORING_KINDS:
        crd = yaml.safe_load((crd_dir / f"monitoring.coreos.com_{kind.lower()}s.yaml").read_text())
        assert crd["spec"]["names"]["kind"] == kind
        crds[kind] = crd
    return crds


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema with ``additionalProperties: false`` on every object that
    lists ``properties`` and allows nothing else (no ``additionalProperties``, no
    ``x-kubernetes-preserve-unknown-fields``), and RE2 patterns that open with ``^(?i)`` written
    as Python's ``re`` accepts them."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            pattern = node.get("pattern")
            if isinstance(pattern, str) and pattern.startswith("^(?i)"):  # Go's RE2; Python wants flags first
                node["pattern"] = "(?i)^" + pattern[len("^(?i)"):]
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(crd: dict) -> dict:
    """The strict schema of the CRD's served storage version."""
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return strict(version["schema"]["openAPIV3Schema"])


def validate(doc: dict) -> None:
    """Validate one manifest; raises ``kubernetes_validate.ValidationError`` /
    ``jsonschema.ValidationError`` on the first invalid field, ``KeyError`` for a custom kind
    this module has no schema for."""
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(doc, crd_schema(prometheus_operator_crds()[doc["kind"]]))
        return
    kubernetes_validate.validate(doc, kube_version().removeprefix("v"), strict=True)
