"""Fail an image build when an installed distribution is not pinned by requirements.lock.

Run inside the image after its dependencies are installed::

    python3 check_pins.py requirements.lock [--allow NAME ...]

Compares ``importlib.metadata`` of the running interpreter's environment with the lock file
(names normalised as in PEP 503, versions compared as strings). Exits 1 listing every
distribution whose version differs from the lock or which the lock does not name, so an image
never carries an unpinned transitive dependency.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", nargs="+", help="lock files (NAME==VERSION per line)")
    parser.add_argument("--allow", nargs="*", default=[], help="distributions not checked (the project itself)")
    args = parser.parse_args()
    pins: dict[str, str] = {}
    for path in args.lock:
        for line in open(path, encoding="utf-8"):
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_norm(name)] = version.strip()
    allowed = {_norm(n) for n in args.allow} | {"pip"}
    bad = []
    for dist in metadata.distributions():
        name = _norm(dist.metadata["Name"])
        if name in allowed:
            continue
        if pins.get(name) != dist.version:
            bad.append(f"{name}=={dist.version} (lock: {pins.get(name, 'not pinned')})")
    if bad:
        print("installed but not pinned by the lock:\n  " + "\n  ".join(sorted(bad)), file=sys.stderr)
        return 1
    print(f"check_pins: all installed distributions match the lock ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
