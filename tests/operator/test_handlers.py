"""handlers.py helpers: owner lookup of a child event, retry back-off, CLI flags."""

from __future__ import annotations

from kubeinfer_operator.__main__ import build_parser
from kubeinfer_operator.handlers import RETRY_MAX_SECONDS, owner_name, retry_delay


def test_owner_is_the_controlling_inferenceservice():
    child = {"metadata": {"ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "controller": False},
        {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService", "name": "chat", "controller": True},
    ]}}
    assert owner_name(child) == "chat"


def test_children_of_other_controllers_are_ignored():
    other = {"metadata": {"ownerReferences": [
        {"apiVersion": "other.io/v1", "kind": "InferenceService", "name": "x", "controller": True}]}}
    not_controller = {"metadata": {"ownerReferences": [
        {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService", "name": "x"}]}}
    assert owner_name(other) is None
    assert owner_name(not_controller) is None
    assert owner_name({"metadata": {}}) is None


def test_retry_backs_off_exponentially_to_a_cap():
    delays = [retry_delay(n) for n in range(10)]
    assert delays[1] == 2 * delays[0]
    assert delays == sorted(delays)
    assert delays[-1] == RETRY_MAX_SECONDS


def test_cli_scope_flags():
    args = build_parser().parse_args(["-n", "a", "-n", "b", "--liveness", ""])
    assert args.namespace == ["a", "b"] and not args.all_namespaces and args.liveness == ""
    assert build_parser().parse_args(["-A"]).all_namespaces


def test_kedas_hpa_belongs_to_the_isvc_named_in_its_labels():
    body = {"metadata": {"labels": {"serving.kubeinfer.io/inferenceservice": "chat"}, "ownerReferences": [
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "name": "chat", "controller": True}]}}
    assert owner_name(body) == "chat"
