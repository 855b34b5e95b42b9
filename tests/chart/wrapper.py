"""A platform chart that depends on deploy/helm/kubeinfer (``file://``), as platform teams wrap it:
``global`` values shared with every subchart, the dependency switched by ``kubeinfer.enabled``,
and image pull secrets both as ``global.imagePullSecrets`` and as the subchart's own."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.chart.chart import CHART

PARENT_CHART = {"apiVersion": "v2", "name": "ml-platform", "version": "1.0.0",
                "dependencies": [{"name": "kubeinfer", "version": "0.1.0", "repository": f"file://{CHART}",
                                  "condition": "kubeinfer.enabled"}]}
#: Pull secrets in the order the operator's pods get them: the subchart's own, then the global ones.
PULL_SECRETS = ["regcred", "global-regcred"]
PARENT_VALUES: dict[str, Any] = {
    "global": {"imagePullSecrets": [{"name": "global-regcred"}], "imageRegistry": "registry.example.com"},
    "platformName": "ml",
    "kubeinfer": {"enabled": True, "imagePullSecrets": ["regcred"],
                  "servingImage": "registry.example.com/ml/kubeinfer-serving:0.1.0"},
}
#: One object of the parent's own, reading the same global values.
PARENT_TEMPLATE = """apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-platform
data:
  name: {{ .Values.platformName }}
  pullSecrets: {{ .Values.global.imagePullSecrets | toJson | quote }}
"""


def write_parent_chart(root: Path, kubeinfer_values: dict[str, Any] | None = None) -> Path:
    """Write the platform chart under ``root`` and return its directory.

    ``kubeinfer_values`` are merged (top-level keys replaced) into the parent's ``kubeinfer:``
    values. Package its dependency with ``helm dependency update --skip-refresh DIR``.
    """
    values = copy.deepcopy(PARENT_VALUES)
    values["kubeinfer"].update(kubeinfer_values or {})
    parent = root / "ml-platform"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(yaml.safe_dump(PARENT_CHART))
    (parent / "values.yaml").write_text(yaml.safe_dump(values))
    (parent / "templates" / "platform.yaml").write_text(PARENT_TEMPLATE)
    return parent
