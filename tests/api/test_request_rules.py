"""The model's request rules (``engine/validation.py``) as clients see them: one message per rule,
whichever layer applies it, naming the field at fault."""

from __future__ import annotations

import httpx
import pytest
from kubeinfer_serving.engine.errors import PromptTooLongError

from tests.api.conftest import MAX_MODEL_LEN, MODEL

VOCAB = 8192  # the built-in tiny Llama's vocabulary


def _error(server, route: str, body: dict) -> dict:
    r = httpx.post(f"{server.base_url}/v1/{route}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    return r.json()["error"]


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {str(VOCAB + 5): 1.0}),
    ("stop_token_ids", [VOCAB + 5]),
])
def test_token_ids_outside_the_vocabulary_name_their_field(server, field: str, value) -> None:
    err = _error(server, "completions", {"prompt": "hi", "max_tokens": 2, field: value})
    assert err["param"] == field and f"token id {VOCAB + 5} is outside the vocabulary" in err["message"]
    prompt_err = _error(server, "completions", {"prompt": [1, VOCAB + 5], "max_tokens": 2})
    assert prompt_err["param"] == "prompt" and prompt_err["message"] == err["message"]


def test_context_length_has_one_wording_on_every_route(server) -> None:
    """prompt + max_tokens beyond the context: the same message from completions (token prompt),
    chat (rendered prompt) and the engine's own check, each naming its own field."""
    prompt = [100] * 40
    err = _error(server, "completions", {"prompt": prompt, "max_tokens": MAX_MODEL_LEN})
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert err["message"] == str(PromptTooLongError(MAX_MODEL_LEN, 40, MAX_MODEL_LEN))
    chat = _error(server, "chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": MAX_MODEL_LEN})
    assert chat["code"] == "context_length_exceeded" and chat["param"] == "messages"
    assert chat["message"].startswith(f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
                                      "requested ") and chat["message"].endswith(
        "Please reduce the length of the prompt or completion.")


def test_priority_on_a_first_come_first_served_model_names_the_policy(server) -> None:
    for route, body in (("completions", {"prompt": "hi"}),
                        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        err = _error(server, route, {**body, "max_tokens": 2, "priority": 3})
        assert err["param"] == "priority" and err["code"] == "unsupported_parameter"
        assert err["message"] == (f"priority needs the priority scheduling policy; model {MODEL!r} schedules first "
                                  "come, first served")
