"""Passive health: ejection after consecutive failures, re-admission with backoff and jitter, and
which answers count as failures or may be retried."""

from __future__ import annotations

import json
import random

import pytest
from kubeinfer_router.health import EjectionPolicy, is_ejected, is_failure, is_retryable
from kubeinfer_router.keys import RoutingKey
from kubeinfer_router.picker import Picker
from kubeinfer_router.state import EndpointState, EndpointTable


class FixedRng:
    """uniform(a, b) always returns a + fraction * (b - a)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + self.fraction * (b - a)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoint() -> EndpointState:
    return EndpointState(url="http://10.0.0.1:8000", name="pod-1")


def test_ejected_after_the_third_consecutive_failure_not_before():
    policy = EjectionPolicy(failures=3, base_seconds=2.0, jitter=0.0, rng=FixedRng(0.5))
    ep = endpoint()
    assert policy.record_failure(ep, 10.0) is False
    assert policy.record_failure(ep, 10.0) is False
    assert not is_ejected(ep, 10.0)
    assert policy.record_failure(ep, 10.0) is True
    assert is_ejected(ep, 11.9) and not is_ejected(ep, 12.0)


def test_a_success_resets_the_consecutive_count():
    policy = EjectionPolicy(failures=3, jitter=0.0)
    ep = endpoint()
    for _ in range(5):
        policy.record_failure(ep, 0.0)
        policy.record_failure(ep, 0.0)
        policy.record_success(ep, 0.0)
    assert not is_ejected(ep, 0.0) and ep.ejection_count == 0


@pytest.mark.parametrize("fraction, factor", [(0.0, 0.8), (1.0, 1.2), (0.5, 1.0)])
def test_the_ejection_length_carries_the_jitter(fraction, factor):
    policy = EjectionPolicy(failures=1, base_seconds=2.0, jitter=0.2, rng=FixedRng(fraction))
    ep = endpoint()
    policy.record_failure(ep, 100.0)
    assert ep.ejected_until == pytest.approx(100.0 + 2.0 * factor)


def test_jitter_spreads_the_readmission_of_endpoints_ejected_together():
    policy = EjectionPolicy(failures=1, base_seconds=2.0, jitter=0.2, rng=random.Random(7))
    ends = []
    for _ in range(50):
        ep = endpoint()
        policy.record_failure(ep, 0.0)
        ends.append(ep.ejected_until)
    assert all(1.6 <= end <= 2.4 for end in ends)
    assert len(set(ends)) == 50 and max(ends) - min(ends) > 0.4


def test_readmitted_endpoint_is_on_probation_and_backs_off_exponentially_to_the_cap():
    policy = EjectionPolicy(failures=3, base_seconds=2.0, max_seconds=60.0, jitter=0.0)
    ep = endpoint()
    now = 0.0
    for _ in range(3):
        policy.record_failure(ep, now)
    lengths = [ep.ejected_until - now]
    for _ in range(7):
        now = ep.ejected_until  # cool-down over: re-admitted
        assert not is_ejected(ep, now)
        assert policy.record_failure(ep, now) is True  # one failure on probation ejects again
        lengths.append(ep.ejected_until - now)
    assert lengths == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_a_success_after_readmission_clears_the_backoff():
    policy = EjectionPolicy(failures=3, base_seconds=2.0, jitter=0.0)
    ep = endpoint()
    for _ in range(3):
        policy.record_failure(ep, 0.0)
    policy.record_failure(ep, ep.ejected_until)  # probation failure: 4 s
    now = ep.ejected_until
    policy.record_success(ep, now)
    assert ep.ejection_count == 0
    assert policy.record_failure(ep, now) is False  # no longer on probation: needs 3 again
    policy.record_failure(ep, now)
    assert policy.record_failure(ep, now) is True
    assert ep.ejected_until - now == pytest.approx(2.0)


def test_a_success_while_ejected_does_not_cut_the_backoff_history():
    policy = EjectionPolicy(failures=1, base_seconds=2.0, jitter=0.0)
    ep = endpoint()
    policy.record_failure(ep, 0.0)
    policy.record_success(ep, 1.0)  # a request from before the ejection finished well
    assert is_ejected(ep, 1.0) and ep.ejection_count == 1


def test_failures_of_requests_in_flight_while_ejected_do_not_extend_the_ejection():
    policy = EjectionPolicy(failures=1, base_seconds=2.0, jitter=0.0)
    ep = endpoint()
    policy.record_failure(ep, 0.0)
    until = ep.ejected_until
    assert policy.record_failure(ep, 1.0) is False
    assert ep.ejected_until == until and ep.ejection_count == 1


@pytest.mark.parametrize("kwargs", [{"failures": 0}, {"base_seconds": 0}, {"max_seconds": 1.0},
                                    {"jitter": 1.0}, {"jitter": -0.1}])
def test_bad_policy_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        EjectionPolicy(**kwargs)


def test_the_table_ejects_and_the_picker_skips_until_the_cool_down_ends():
    clock = Clock()
    table = EndpointTable(clock=clock, policy=EjectionPolicy(failures=2, base_seconds=5.0, jitter=0.0))
    table.sync({"http://a:8000": ("a", True), "http://b:8000": ("b", True)})
    picker = Picker(clock=clock)
    key = RoutingKey(model=None, adapter=None, affinity="")
    assert table.record_failure("http://a:8000") is False
    assert table.record_failure("http://a:8000") is True
    assert {picker.pick(table.all(), key).reason for _ in range(3)} == {"only"}
    assert picker.pick(table.all(), key).endpoint.name == "b"
    clock.now += 5.0
    assert picker.pick(table.all(), key).reason == "any"  # both usable again
    table.record_success("http://a:8000")
    assert table.get("http://a:8000").ejection_count == 0
    assert table.record_failure("http://gone:8000") is False


@pytest.mark.parametrize("status, failure", [(200, False), (400, False), (404, False), (413, False),
                                             (429, False), (500, True), (502, True), (503, True),
                                             (504, True)])
def test_which_answers_are_failures(status, failure):
    assert is_failure(None, status) is failure


def test_errors_before_the_headers_are_failures():
    assert is_failure(ConnectionRefusedError(), None)
    assert is_failure(TimeoutError(), None)
    assert not is_failure(None, None)


def shutting_down(code: str = "server_shutting_down") -> bytes:
    return json.dumps({"error": {"message": "The server is shutting down", "type": "server_error",
                                 "param": None, "code": code}}).encode()


class ClientConnectionError(Exception):
    """Stands in for aiohttp's (not an OSError): recognised by its class name."""


class ServerDisconnectedError(ClientConnectionError):
    pass


@pytest.mark.parametrize("error", [ConnectionRefusedError(), ConnectionResetError(), OSError(113, "no route"),
                                   ServerDisconnectedError()])
def test_connection_errors_are_retried_before_anything_reached_the_client(error):
    assert is_retryable(error, None, None, bytes_sent_to_client=0)
    assert not is_retryable(error, None, None, bytes_sent_to_client=1)


def test_a_draining_503_is_retried_but_never_after_the_first_byte():
    assert is_retryable(None, 503, shutting_down(), 0)
    assert not is_retryable(None, 503, shutting_down(), 17)


@pytest.mark.parametrize("error, status, body", [
    (TimeoutError(), None, None),  # the pod may still be running it
    (ValueError("bad"), None, None),
    (None, 503, shutting_down("engine_dead")),
    (None, 503, b"not json"),
    (None, 503, None),
    (None, 500, shutting_down()),
    (None, 429, None),
    (None, 400, None),
    (None, 200, None),
])
def test_other_outcomes_are_not_retried(error, status, body):
    assert not is_retryable(error, status, body, 0)
