"""``kubeinfer-serve``'s entry point: exit at once on SIGTERM until the server takes over.

In a container the server is PID 1, and the kernel gives PID 1 no default signal actions: a
SIGTERM that arrives before uvicorn installs its handlers (while torch, transformers and the
model code import: seconds) is ignored, and the kubelet then waits the pod's whole
``terminationGracePeriodSeconds`` before SIGKILL (Kubernetes docs, "Pod Lifecycle",
"Termination of Pods"; signal(7) on PID 1). That happens whenever a pod is deleted while it
starts: KEDA scaling to zero, a rollout, a scale-down. Nothing is in flight before the server
runs, so exiting at once (status 143 = 128 + SIGTERM, what the default action reports) loses
nothing. uvicorn replaces this handler with its draining one when it starts serving.

Only the standard library is imported before the handler is installed.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType


def _exit_before_serving(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    """Install the early SIGTERM handler, then run :func:`kubeinfer_serving.__main__.main`."""
    signal.signal(signal.SIGTERM, _exit_before_serving)
    from kubeinfer_serving.__main__ import main as serve

    serve(argv)


if __name__ == "__main__":
    main()
