"""Write (or check) the values table of a chart's README.md from its values.yaml, helm-docs style.

A key is documented by a ``# -- description`` comment right above it (following ``#`` lines
continue the description), as helm-docs (github.com/norwoodj/helm-docs) reads values.yaml. The
table (Key, Type, Default, Description: helm-docs' columns, default as JSON) replaces whatever
lies between the README's ``<!-- values:start -->`` and ``<!-- values:end -->`` lines.

Usage::

    python deploy/helm/values_readme.py                 # rewrite deploy/helm/kubeinfer/README.md
    python deploy/helm/values_readme.py --check         # exit 1, naming the keys, if it is stale
    python deploy/helm/values_readme.py --chart DIR     # another chart directory

``--check`` also fails when a key of values.yaml is neither documented nor below a documented key.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

START = "<!-- values:start -->"
END = "<!-- values:end -->"
DEFAULT_CHART = Path(__file__).resolve().parent / "kubeinfer"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
_DOC = re.compile(r"^ *# -- ?(?P<text>.*)$")
_MORE = re.compile(r"^ *# ?(?P<text>.*)$")


@dataclass(frozen=True)
class Row:
    """One documented key: dotted ``key``, helm-docs ``type``, JSON ``default``, ``description``."""

    key: str
    type: str
    default: str
    description: str


def _type_of(value: Any) -> str:
    """helm-docs' type name of a YAML value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _lookup(values: dict, path: list[str]) -> Any:
    node: Any = values
    for part in path:
        node = node[part]
    return node


def key_paths(text: str) -> tuple[list[list[str]], dict[str, str]]:
    """Every mapping key of a values.yaml in file order (as paths), and dotted key -> description.

    Only block-style mappings nest (``a:\\n  b: 1``); flow-style values (``{...}``, ``[...]``)
    and list items are values, not keys. Raises ``ValueError`` for a ``# --`` comment that no
    key follows.
    """
    stack: list[tuple[int, str]] = []
    paths: list[list[str]] = []
    docs: dict[str, str] = {}
    pending: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if doc := _DOC.match(line):
            pending = [doc.group("text").strip()]
            continue
        if pending is not None and (more := _MORE.match(line)):
            pending.append(more.group("text").strip())
            continue
        if not line.strip():
            if pending is not None:
                raise ValueError(f"line {number}: a blank line between a '# --' comment and its key")
            continue
        key = _KEY.match(line)
        if key is None or line.lstrip().startswith("-"):
            if pending is not None:
                raise ValueError(f"line {number}: a '# --' comment not followed by a key")
            continue
        indent = len(key.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key.group("key")))
        path = [k for _, k in stack]
        paths.append(path)
        if pending is not None:
            docs[".".join(path)] = " ".join(t for t in pending if t)
            pending = None
    if pending is not None:
        raise ValueError("a '# --' comment at the end of the file documents no key")
    return paths, docs


def rows(values_text: str) -> list[Row]:
    """The documented keys of a values.yaml, in file order."""
    values = yaml.safe_load(values_text) or {}
    paths, docs = key_paths(values_text)
    out = []
    for path in paths:
        dotted = ".".join(path)
        if dotted in docs:
            value = _lookup(values, path)
            out.append(Row(dotted, _type_of(value), json.dumps(value, separators=(",", ":")), docs[dotted]))
    return out


def undocumented(values_text: str) -> list[str]:
    """Keys that are neither documented nor below a documented key (dotted paths)."""
    paths, docs = key_paths(values_text)
    return [".".join(p) for p in paths
            if not any(".".join(p[:i]) in docs for i in range(1, len(p) + 1))
            and not any(".".join(q[: len(p)]) == ".".join(p) and len(q) > len(p) for q in paths)]


def table(values_text: str) -> str:
    """The Markdown values table (header included, no trailing newline)."""
    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for row in rows(values_text):
        description = row.description.replace("|", "\\|")
        lines.append(f"| `{row.key}` | {row.type} | `{row.default}` | {description} |")
    return "\n".join(lines)


def render_readme(readme: str, values_text: str) -> str:
    """``readme`` with the text between the value markers replaced by the table.

    Raises ``ValueError`` when the markers are missing.
    """
    if START not in readme or END not in readme:
        raise ValueError(f"README lacks the {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(values_text)}\n{END}{tail}"


def table_keys(readme: str) -> list[str]:
    """The keys the README's values table lists (first column), in order."""
    block = readme.split(START, 1)[1].split(END, 1)[0] if START in readme else ""
    return re.findall(r"^\| `([^`]+)` \|", block, flags=re.M)


def check(chart: Path) -> list[str]:
    """Problems with ``chart``'s README values table; empty when it is in sync with values.yaml."""
    values_text = (chart / "values.yaml").read_text()
    readme = (chart / "README.md").read_text()
    problems = [f"values.yaml key {k} has no '# --' description (nor has a key above it)"
                for k in undocumented(values_text)]
    documented = [r.key for r in rows(values_text)]
    listed = table_keys(readme)
    problems += [f"README lacks values.yaml key {k}" for k in documented if k not in listed]
    problems += [f"README lists {k}, which values.yaml does not document" for k in listed if k not in documented]
    if not problems and render_readme(readme, values_text) != readme:
        problems.append("README values table differs from values.yaml (types, defaults or descriptions)")
    return problems


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1: ``--check`` found problems)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chart", type=Path, default=DEFAULT_CHART, help="chart directory")
    parser.add_argument("--check", action="store_true", help="only report whether README.md is in sync")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.chart)
        for problem in problems:
            print(f"{args.chart / 'README.md'}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    values_text = (args.chart / "values.yaml").read_text()
    if undocumented(values_text):
        print(f"undocumented values.yaml keys: {', '.join(undocumented(values_text))}", file=sys.stderr)
        return 1
    readme = args.chart / "README.md"
    readme.write_text(render_readme(readme.read_text(), values_text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
