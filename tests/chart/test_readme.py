"""The chart README's values table is generated from values.yaml (deploy/helm/values_readme.py) and
kept in sync; values.yaml and values.schema.json name the same keys."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.chart.chart import CHART, values_readme

SCRIPT = CHART.parent / "values_readme.py"


def check(chart: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--chart", str(chart), "--check"],
                          capture_output=True, text=True, timeout=60)


def copy_chart(tmp_path: Path) -> Path:
    chart = tmp_path / "kubeinfer"
    chart.mkdir()
    for name in ("values.yaml", "README.md"):
        shutil.copy(CHART / name, chart / name)
    return chart


def test_readme_values_table_is_in_sync():
    result = check(CHART)
    assert result.returncode == 0, result.stderr


def test_a_key_missing_from_the_readme_fails_the_check(tmp_path):
    chart = copy_chart(tmp_path)
    readme = (chart / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `priorityClassName` |"))
    (chart / "README.md").write_text(readme.replace(row + "\n", ""))
    result = check(chart)
    assert result.returncode == 1 and "README lacks values.yaml key priorityClassName" in result.stderr


def test_a_readme_key_values_yaml_does_not_document_fails_the_check(tmp_path):
    chart = copy_chart(tmp_path)
    values = (chart / "values.yaml").read_text()
    (chart / "values.yaml").write_text(values.replace("# -- `priorityClassName` of the operator pod; empty: none.\n", ""))
    result = check(chart)
    assert result.returncode == 1
    assert "README lists priorityClassName, which values.yaml does not document" in result.stderr
    assert "values.yaml key priorityClassName has no '# --' description" in result.stderr


def test_a_changed_default_fails_the_check_and_the_script_rewrites_the_table(tmp_path):
    chart = copy_chart(tmp_path)
    values = (chart / "values.yaml").read_text()
    (chart / "values.yaml").write_text(values.replace("drainSeconds: 120", "drainSeconds: 90"))
    result = check(chart)
    assert result.returncode == 1 and "differs" in result.stderr
    subprocess.run([sys.executable, str(SCRIPT), "--chart", str(chart)], check=True, timeout=60)
    assert check(chart).returncode == 0
    assert "| `drainSeconds` | int | `90` |" in (chart / "README.md").read_text()


def test_table_rows_carry_type_default_and_description():
    rows = {r.key: r for r in values_readme().rows((CHART / "values.yaml").read_text())}
    assert rows["image.pullPolicy"].type == "string" and rows["image.pullPolicy"].default == '"IfNotPresent"'
    assert rows["startupTimeoutSeconds"].type == "int" and rows["startupTimeoutSeconds"].default == "1800"
    assert rows["imagePullSecrets"].type == "list" and "KUBEINFER_IMAGE_PULL_SECRETS" in rows[
        "imagePullSecrets"].description
    assert rows["resources"].type == "object" and json.loads(rows["resources"].default)["limits"] == {"memory": "512Mi"}
    assert "resources.requests" not in rows  # documented as a whole, above


def _object_keys(values: dict, schema: dict, path: str = "") -> list[str]:
    """Differences between values.yaml's mapping keys and the strict schema's properties."""
    problems = []
    props = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        problems += [f"{path}{k}: in values.yaml, not in the schema" for k in values if k not in props]
    problems += [f"{path}{k}: in the schema, not in values.yaml" for k in props if k not in values]
    for key, value in values.items():
        if isinstance(value, dict) and key in props and "properties" in props[key]:
            problems += _object_keys(value, props[key], f"{path}{key}.")
    return problems


def test_values_yaml_and_the_schema_name_the_same_keys():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    problems = [p for p in _object_keys(values, schema) if not p.startswith("global.")]  # global: a parent's
    assert not problems, problems
