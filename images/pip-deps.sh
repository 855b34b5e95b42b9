#!/bin/sh
# Dependency steps shared by serving/Dockerfile and operator/Dockerfile (run inside the build).
#
#   pip-deps.sh resolve DEPS_EXPR OUT [EXTRA_REQ ...]
#       DEPS_EXPR: a Python expression over `project` (pyproject.toml's [project] table) giving the
#       requirement list, e.g. "project['dependencies']". Resolves those (plus EXTRA_REQ) under
#       requirements.lock and requirements-build.lock with `pip install --dry-run --report` into an
#       exact NAME==VERSION list OUT, and fails unless every line is pinned by the locks.
#   pip-deps.sh install PINS
#       creates $VIRTUAL_ENV, installs requirements-build.lock, then exactly PINS (--no-deps), runs
#       `pip check`, and fails unless everything installed is at the pinned version.
# Both trust /run/secrets/ca-bundle when the build passed that secret (never stored in a layer).
# Run from the directory holding pyproject.toml, the lock files and check_pins.py.
set -eu
if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi
case "$1" in
  resolve)
    expr="$2"; out="$3"; shift 3
    python3 -m venv /tmp/resolver
    /tmp/resolver/bin/pip install -q --disable-pip-version-check -r requirements-build.lock
    python3 -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join($expr))" > deps.txt
    /tmp/resolver/bin/pip install -q --disable-pip-version-check --dry-run --ignore-installed --report report.json \
      -c requirements.lock -c requirements-build.lock -r deps.txt "$@"
    python3 -c "import json; print('\n'.join(sorted(i['metadata']['name'] + '==' + i['metadata']['version'] for i in json.load(open('report.json'))['install'])))" > "$out"
    python3 check_pins.py requirements.lock requirements-build.lock --resolved "$out"
    rm -rf /tmp/resolver ;;
  install)
    python3 -m venv "$VIRTUAL_ENV"
    pip install -q -r requirements-build.lock
    pip install -q --no-deps -r "$2"
    pip check
    python3 check_pins.py "$2" requirements-build.lock ;;
  *) echo "usage: pip-deps.sh resolve DEPS_EXPR OUT [REQ ...] | install PINS" >&2; exit 2 ;;
esac
