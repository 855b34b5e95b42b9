"""Request fields this server does not implement are refused with 400 naming them, never ignored.

Request bodies keep fields their schema does not declare (``extra="allow"``). Such a field is
either one of OpenAI's or vLLM's that this server does not implement (listed in
:data:`UNSUPPORTED` with the value that means "off", which is accepted), or unknown altogether;
both are answered with 400 ``unsupported_parameter`` / ``unrecognized_parameter`` naming the
field, as OpenAI's API answers an unknown argument. Declared fields whose values this server
cannot honour are checked by the routes (e.g. ``best_of`` other than ``n``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kubeinfer_serving.api.errors import APIError

#: OpenAI and vLLM request fields this server does not implement -> the values that mean "off"
#: (accepted, since they ask for nothing this server lacks).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # OpenAI chat completions
    "audio": (None,),
    "function_call": (None, "none"),
    "functions": (None, []),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "moderation": (None,),
    "prediction": (None,),
    "prompt_cache_key": (None,),
    "prompt_cache_options": (None,),
    "prompt_cache_retention": (None,),
    "reasoning_effort": (None,),
    "safety_identifier": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "verbosity": (None,),
    "web_search_options": (None,),
    # vLLM extensions
    "prompt_embeds": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "logits_processors": (None, []),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None, {}),
    "mm_processor_kwargs": (None, {}),
    "documents": (None, []),
    "chat_template": (None,),
    "structural_tag": (None,),
    "include_reasoning": (None, True),
    "request_id": (None,),
    "add_special_tokens": (None,),  # accepted at each route's default (completions true, chat false)
}

#: Why a field is refused, where a hint helps.
_HINTS = {
    "prompt_logprobs": "use echo with logprobs (completions) to get the prompt's log-probabilities",
    "functions": "use tools",
    "function_call": "use tool_choice",
    "use_beam_search": "beam search is not implemented",
}


def _refuse(name: str, value: Any) -> None:
    if name in UNSUPPORTED:
        if any(value == ok for ok in UNSUPPORTED[name]):
            return
        hint = _HINTS.get(name)
        raise APIError(400, f"{name} is not supported by this server" + (f" ({hint})" if hint else ""),
                       param=name, code="unsupported_parameter")
    raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unrecognized_parameter")


def refuse_unknown_fields(body: BaseModel, *, defaults: dict[str, Any] | None = None, prefix: str = "") -> None:
    """Raise 400 for any field of ``body`` (and of its nested request models) that is not implemented.

    Args:
        body: a parsed request (or nested part) whose model keeps extra fields.
        defaults: extra fields accepted at exactly these values (route-specific defaults, such
            as vLLM's ``add_special_tokens``).
        prefix: the path of ``body`` in the request, for the error's ``param`` (e.g. ``messages[2].``).

    Raises:
        APIError: 400 ``unsupported_parameter`` for a known field set to a value other than off,
            400 ``unrecognized_parameter`` for a field neither OpenAI nor vLLM defines.
    """
    for name, value in (body.model_extra or {}).items():
        if defaults and name in defaults and value == defaults[name]:
            continue
        try:
            _refuse(name, value)
        except APIError as exc:
            exc.param = prefix + name
            raise
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel) and item.model_config.get("extra") == "allow":
                where = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                refuse_unknown_fields(item, prefix=where)
