"""Passive health of endpoints: what counts as a failure, ejection with backoff, and the retry rule.

Passive health checking (outlier detection) watches real answers instead of probing: after
``failures`` consecutive failures an endpoint is ejected for a cool-down that doubles with each
ejection up to a cap, with multiplicative jitter so several routers do not re-admit a sick pod at the
same instant (Envoy's outlier detection ejects for ``base_ejection_time * number_of_ejections``; the
exponential form with "equal jitter" is from the AWS Architecture Blog, "Exponential Backoff And
Jitter", 2015). When the cool-down ends the endpoint is re-admitted on probation: one success clears
its ejection history, one failure ejects it again at once with the next, longer backoff.

Failure (counts towards ejection): a connection error, a timeout before the response headers, or a
5xx answer. A 4xx (429 included) is the client's or the admission queue's answer, not a sick pod.

Retry (:func:`is_retryable`): only while nothing has reached the client, and only when the request
certainly did not run to an answer elsewhere: a connection error (refused, reset, closed before the
response headers), or a 503 whose OpenAI error body says the pod is shutting down
(``server_shutting_down``, written by ``kubeinfer_serving.api.drain``). Never after a stream began.

Pure logic: the clock is passed in as ``now`` (monotonic seconds), the RNG is injectable.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubeinfer_router.state import EndpointState

#: OpenAI error ``code`` values of a 503 that means "this pod is going away, another one will serve it".
DRAINING_ERROR_CODES = frozenset({"server_shutting_down"})

# aiohttp's connection failures that are not OSErrors (ServerDisconnectedError and friends) derive
# from ClientConnectionError; matched by class name so this module stays standard-library only.
_CONNECTION_ERROR_CLASS_NAMES = frozenset({"ClientConnectionError", "ServerDisconnectedError"})


class EjectionPolicy:
    """When to eject an endpoint and for how long; mutates ``EndpointState`` health fields.

    Args:
        failures: consecutive failures that eject an endpoint (>= 1).
        base_seconds: the first ejection's length before jitter (> 0).
        max_seconds: the longest ejection before jitter (>= base_seconds).
        jitter: relative jitter in [0, 1): an ejection lasts ``backoff * (1 + u)``, ``u`` uniform in
            ``[-jitter, +jitter]``.
        rng: source of ``uniform`` (a ``random.Random``; a fresh one when None).

    Raises:
        ValueError: a parameter is out of its range.
    """

    def __init__(self, failures: int = 3, base_seconds: float = 2.0, max_seconds: float = 60.0,
                 jitter: float = 0.2, rng: random.Random | None = None) -> None:
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if base_seconds <= 0 or max_seconds < base_seconds:
            raise ValueError(f"need 0 < base_seconds <= max_seconds, got {base_seconds}, {max_seconds}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.failures = failures
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.jitter = jitter
        self.rng = rng if rng is not None else random.Random()

    def backoff_seconds(self, ejection_count: int) -> float:
        """The ejection length before jitter after ``ejection_count`` earlier ejections (seconds):
        ``min(max_seconds, base_seconds * 2**ejection_count)``."""
        return min(self.max_seconds, self.base_seconds * 2.0 ** min(ejection_count, 62))

    def record_failure(self, ep: EndpointState, now: float) -> bool:
        """Count one failure of ``ep`` at monotonic time ``now``; eject it when the rule says so.

        The rule: an endpoint on probation (ejected before, cool-down over, no success since) is
        ejected again at once; otherwise after ``failures`` consecutive failures. Failures of
        requests that were already in flight while it is ejected do not extend the ejection.

        Returns:
            True when this failure ejected the endpoint (for the ejections metric).
        """
        ep.consecutive_failures += 1
        if is_ejected(ep, now):
            return False
        on_probation = ep.ejection_count > 0
        if not on_probation and ep.consecutive_failures < self.failures:
            return False
        backoff = self.backoff_seconds(ep.ejection_count)
        ep.ejected_until = now + backoff * (1.0 + self.rng.uniform(-self.jitter, self.jitter))
        ep.ejection_count += 1
        ep.consecutive_failures = 0
        return True

    def record_success(self, ep: EndpointState, now: float) -> None:
        """Count one success of ``ep``: its consecutive failures reset; once re-admitted (cool-down
        over) its ejection history resets too, so the next ejection starts at ``base_seconds``."""
        ep.consecutive_failures = 0
        if not is_ejected(ep, now):
            ep.ejection_count = 0


def is_ejected(ep: EndpointState, now: float) -> bool:
    """Whether ``ep`` is ejected at monotonic time ``now`` (``now < ep.ejected_until``)."""
    return now < ep.ejected_until


def is_connection_error(error: BaseException | None) -> bool:
    """Whether ``error`` means the request never got an answer from the pod: refused, reset, or the
    connection closed before the response headers. Timeouts are not connection errors (the pod may
    still be working on the request)."""
    if error is None or isinstance(error, TimeoutError):
        return False
    if isinstance(error, (ConnectionError, OSError)):
        return True
    return any(cls.__name__ in _CONNECTION_ERROR_CLASS_NAMES for cls in type(error).__mro__)


def is_failure(error: BaseException | None, status: int | None) -> bool:
    """Whether an attempt counts as a failure of the endpoint (towards ejection).

    Args:
        error: the exception that ended the attempt before the response headers, or None.
        status: the HTTP status of the answer, or None when there was none.

    Returns:
        True for a connection error, a timeout before the response headers (any exception), or a
        5xx status; False for 1xx-4xx (429 included).
    """
    if error is not None:
        return True
    return status is not None and status >= 500


def draining_error_code(body: bytes | None) -> str | None:
    """The OpenAI error ``code`` of a 503 body when it says the pod is shutting down, else None."""
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code in DRAINING_ERROR_CODES else None


def is_retryable(error: BaseException | None, status: int | None, body: bytes | None,
                 bytes_sent_to_client: int) -> bool:
    """Whether the router may send this request to another endpoint.

    Args:
        error: the exception of the attempt (before any response headers), or None.
        status: the upstream HTTP status, or None when there was no answer.
        body: the upstream answer's body (for a 503: OpenAI's error JSON), or None.
        bytes_sent_to_client: bytes of this request's response already written to the client
            (status line and headers count: anything > 0 forbids a retry).

    Returns:
        True only when nothing was sent to the client yet and either ``error`` is a connection error
        (:func:`is_connection_error`) or the answer is a 503 whose body has a draining code
        (:data:`DRAINING_ERROR_CODES`). False after a stream began, for timeouts, 4xx/429, other 5xx.
    """
    if bytes_sent_to_client > 0:
        return False
    if error is not None:
        return is_connection_error(error)
    return status == 503 and draining_error_code(body) is not None
