"""``kubeinfer-operator``: run the InferenceService operator (kopf) against a cluster.

Credentials: ``--kubeconfig``, else ``$KUBECONFIG`` / ``~/.kube/config``, else the pod's
service account. Watches ``--namespace`` (repeatable) or, with ``--all-namespaces``, every
namespace. Serves kopf's liveness endpoint (``/healthz``) at ``--liveness``, and the operator's
``/metrics`` and readiness (``/readyz``) at ``--metrics`` (:mod:`kubeinfer_operator.metrics`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from kubeinfer_operator.metrics import METRICS_PORT, parse_address, serve


def build_parser() -> argparse.ArgumentParser:
    """The ``kubeinfer-operator`` argument parser."""
    p = argparse.ArgumentParser(prog="kubeinfer-operator", description=__doc__.split("\n", 1)[0])
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="namespace to watch (repeatable, exact names)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--kubeconfig", help="kubeconfig path (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--liveness", default=os.environ.get("KUBEINFER_LIVENESS", "http://0.0.0.0:8080/healthz"),
                   help="liveness endpoint URL, or '' to disable (default %(default)s)")
    p.add_argument("--metrics", default=os.environ.get("KUBEINFER_METRICS_ADDRESS", f"0.0.0.0:{METRICS_PORT}"),
                   help="HOST:PORT of /metrics and /readyz, or '' to disable (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every reconcile")
    p.add_argument("--debug", action="store_true", help="log kopf internals and API calls")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run the operator until SIGINT/SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if not args.namespace and not args.all_namespaces:
        args.all_namespaces = True
    if args.metrics:
        serve(*parse_address(args.metrics))
    import kopf  # after KUBECONFIG is final

    import kubeinfer_operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(debug=args.debug, verbose=args.verbose or args.debug, log_format=kopf.LogFormat.PLAIN)
    if not args.debug:  # -v is about reconciles, not every HTTP request
        logging.getLogger("urllib3").setLevel(logging.WARNING)
    memo = kopf.Memo(namespaces=None if args.all_namespaces else list(args.namespace))
    kopf.run(
        memo=memo,
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
