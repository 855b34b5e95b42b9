"""Routing keys: model, and the affinity string from a session or the prompt's first characters."""

from __future__ import annotations

import pytest
from kubeinfer_router.keys import RoutingKey, request_priority, routing_key

LONG = "You are a careful assistant for the billing team. " * 10  # 500 characters


def test_completions_prompt_gives_its_first_100_characters():
    key = routing_key({"model": "tiny-llama", "prompt": LONG, "max_tokens": 5})
    assert key == RoutingKey(model="tiny-llama", adapter=None, affinity=LONG[:100])


@pytest.mark.parametrize("prompt, affinity", [
    (["first prompt", "second prompt"], "first prompt"),
    ([1, 2, 3], "1,2,3"),
    ([[7, 8], [9]], "7,8"),
    ([], ""),
    (42, ""),
])
def test_completions_prompt_forms(prompt, affinity):
    assert routing_key({"model": "m", "prompt": prompt}).affinity == affinity


def test_a_long_token_id_prompt_is_cut_to_prefix_chars():
    key = routing_key({"model": "m", "prompt": list(range(10_000))}, prefix_chars=10)
    assert key.affinity == "0,1,2,3,4,"


def test_chat_keys_on_the_rendered_start_so_later_turns_keep_the_key():
    turn1 = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Plan a trip to Oslo"}]}
    turn2 = {"model": "m", "messages": turn1["messages"] + [
        {"role": "assistant", "content": "Sure: day 1 ..."}, {"role": "user", "content": "And day 2?"}]}
    assert routing_key(turn1).affinity == "Be brief.\nPlan a trip to Oslo\n"
    assert routing_key(turn2, prefix_chars=20).affinity == "Be brief.\nPlan a tri"
    assert routing_key(turn2, prefix_chars=20) == routing_key(turn1, prefix_chars=20)


def test_chat_requests_sharing_a_long_system_prompt_share_the_key():
    system = {"role": "system", "content": "You are the support agent of ACME. " * 10}
    a = {"model": "m", "messages": [system, {"role": "user", "content": "My order is late"}]}
    b = {"model": "m", "messages": [system, {"role": "user", "content": "Reset my password"}]}
    assert routing_key(a) == routing_key(b)
    assert len(routing_key(a).affinity) == 100


def test_chat_content_parts_are_joined():
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hello "}, {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "world"}]}]}
    assert routing_key(body).affinity == "Hello world\n"


def test_chat_without_messages_has_no_prompt_affinity():
    assert routing_key({"model": "m", "messages": []}).affinity == ""
    assert routing_key({"model": "m", "messages": "not a list"}).affinity == ""


def test_responses_input_string_and_items():
    assert routing_key({"model": "m", "input": "Summarise this"}).affinity == "Summarise this"
    items = {"model": "m", "instructions": "Be terse", "input": [
        {"type": "message", "role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Question one"}]}]}
    assert routing_key(items).affinity == "Be terse\nrules\nQuestion one\n"


def test_embeddings_input_forms():
    assert routing_key({"model": "e", "input": "a sentence"}).affinity == "a sentence"
    assert routing_key({"model": "e", "input": ["one", "two"]}).affinity == "one"
    assert routing_key({"model": "e", "input": [[5, 6]]}).affinity == "5,6"


def test_the_user_field_is_a_session_key():
    body = {"model": "m", "prompt": LONG, "user": "alice"}
    assert routing_key(body).affinity == "alice"


@pytest.mark.parametrize("name", ["x-session-id", "X-Session-Id", "X-SESSION-ID"])
def test_the_session_header_wins_over_user_and_prompt(name):
    body = {"model": "m", "prompt": LONG, "user": "alice"}
    assert routing_key(body, {name: "conv-42", "Authorization": "Bearer k"}).affinity == "conv-42"


def test_prefix_chars_counts_characters_not_bytes():
    assert routing_key({"model": "m", "prompt": "éèêëàâ" * 10}, prefix_chars=4).affinity == "éèêë"
    assert routing_key({"model": "m", "prompt": LONG}, prefix_chars=0).affinity == ""


@pytest.mark.parametrize("body", [None, [], "text", 3, {"model": 5, "prompt": "p"}, {"model": "", "prompt": "p"}])
def test_bodies_without_a_usable_model(body):
    key = routing_key(body, {"x-session-id": "s"})
    assert key.model is None and key.adapter is None
    assert key.affinity in ("s",)


def test_no_body_no_header_is_the_empty_key():
    assert routing_key(None) == RoutingKey(model=None, adapter=None, affinity="")


@pytest.mark.parametrize("body, priority", [({"priority": -1}, -1), ({"priority": 3}, 3), ({}, 0),
                                            ({"priority": "high"}, 0), ({"priority": True}, 0),
                                            (None, 0), ({"priority": 1.5}, 0)])
def test_request_priority(body, priority):
    assert request_priority(body) == priority
