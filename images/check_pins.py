"""Fail an image build when a dependency is not pinned by the lock files.

Two uses inside the image build::

    python3 check_pins.py LOCK [LOCK ...] [--allow NAME ...]
        every distribution installed in the running interpreter's environment is at the version
        the lock files pin (the project itself is allowed with --allow);
    python3 check_pins.py LOCK [LOCK ...] --resolved PINS
        every NAME==VERSION line of PINS (what pip resolved for the image) is pinned by the locks.

Names are normalised as in PEP 503 and versions compared as strings. Exits 1 listing every
distribution whose version differs from the locks or which they do not name, so an image never
carries an unpinned transitive dependency.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _read(paths: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for path in paths:
        for line in open(path, encoding="utf-8"):
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_norm(name)] = version.strip()
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", nargs="+", help="lock files (NAME==VERSION per line)")
    parser.add_argument("--allow", nargs="*", default=[], help="distributions not checked (the project itself)")
    parser.add_argument("--resolved", help="a NAME==VERSION file to check instead of the environment")
    args = parser.parse_args()
    pins = _read(args.lock)
    if args.resolved:
        found = _read([args.resolved]).items()
    else:
        found = [(_norm(d.metadata["Name"]), d.version) for d in metadata.distributions()]
    allowed = {_norm(n) for n in args.allow}
    bad = []
    for name, version in found:
        if name in allowed:
            continue
        if pins.get(name) != version:
            bad.append(f"{name}=={version} (lock: {pins.get(name, 'not pinned')})")
    if bad:
        print("installed but not pinned by the lock:\n  " + "\n  ".join(sorted(bad)), file=sys.stderr)
        return 1
    print(f"check_pins: {len(list(found))} distributions, all at the locks' versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
