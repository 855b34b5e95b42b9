"""The wheel the images install carries everything the code reads at run time (package data)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_has_every_module_and_the_tokenizer_corpus(tmp_path):
    # serving/Dockerfile does `pip install .`; without package data the image build fails when it
    # bakes the built-in model ("No such file ... models/data/corpus.txt").
    # Built from a copy (what the image's build context holds), so no build/ directory of an
    # earlier build can contribute files.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("serving", "operator"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("kubeinfer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "kubeinfer_serving/models/data/corpus.txt" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "kubeinfer-bench = kubeinfer_serving.bench.kubeinfer_bench:main" in scripts
    # the pods' command: the entry point that exits on a SIGTERM during start-up (tests/api/test_entrypoint.py)
    assert "kubeinfer-serve = kubeinfer_serving.entrypoint:main" in scripts
    assert "kubeinfer-activator = kubeinfer_operator.activator:main" in scripts
    for package in ("serving/kubeinfer_serving", "operator/kubeinfer_operator"):
        for module in (REPO / package).rglob("*.py"):
            assert str(module.relative_to(REPO / package.split("/")[0])) in names, module
