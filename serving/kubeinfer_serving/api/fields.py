"""Request fields this server does not declare: ignored and reported, unless ignoring them would change the output.

vLLM's policy (``vllm/entrypoints/openai/protocol.py``, ``OpenAIBaseModel``): a field the server
does not know is accepted and ignored, with a warning in the log. New client versions add fields
all the time (guidellm's ``stream_options.continuous_usage_stats``, OpenAI's ``prompt_cache_key``);
answering each with 400 turns every client upgrade into an outage.

Request bodies keep fields their schema does not declare (``extra="allow"``). Each such field is

* refused with 400 ``unsupported_parameter`` naming it, when it is one this server knows but does
  not implement and its silent loss would change the output (:data:`REFUSED`: beam search,
  logits processors, prompt embeddings, other inputs and output kinds), unless its value is the
  one that means "off";
* otherwise ignored: logged once per field name at warning level, counted in
  ``kubeinfer_ignored_request_fields_total{field}`` and named in the response header
  ``x-kubeinfer-ignored-fields`` (comma-separated). Nested fields are named by their path
  without list indexes (``messages.cache_control``, ``stream_options.sparkle``).

Field names are reported only when they look like field names (:data:`_NAME`), else as
``other``. The header names at most :data:`MAX_HEADER_NAMES` fields per response; the metric's
label set and the log hold the first :data:`MAX_DISTINCT_NAMES` distinct names of the process
and count the rest as ``other``, so no client can grow either without bound (a client that
sends many made-up names only moves later names into ``other`` in the metric; the header of
each response still names them).
Declared fields whose values this server cannot honour are checked by the routes (e.g.
``best_of`` other than ``n``).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request

from kubeinfer_serving import metrics
from kubeinfer_serving.api.errors import APIError

log = logging.getLogger(__name__)

#: OpenAI and vLLM request fields this server does not implement and whose loss would change the
#: output -> the values that mean "off" (accepted, since they ask for nothing this server lacks).
REFUSED: dict[str, tuple[Any, ...]] = {
    # OpenAI chat completions: other output kinds, other inputs, the old function-calling form
    "audio": (None,),
    "modalities": (None, ["text"]),
    "functions": (None, []),
    "function_call": (None, "none"),
    "web_search_options": (None,),
    # vLLM extensions: other inputs, other decoding algorithms, other constraints
    "prompt_embeds": (None,),
    "best_of": (None, 1),  # declared by completions (checked there); chat has no best_of of its own
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "logits_processors": (None, []),
    "vllm_xargs": (None, {}),
    "mm_processor_kwargs": (None, {}),
    "documents": (None, []),
    "chat_template": (None,),
    "structural_tag": (None,),
    "add_special_tokens": (None,),  # accepted at each route's default (completions true, chat false)
}

#: Why a field is refused, where a hint helps.
_HINTS = {
    "prompt_logprobs": "use echo with logprobs (completions) to get the prompt's log-probabilities",
    "functions": "use tools",
    "function_call": "use tool_choice",
    "use_beam_search": "beam search is not implemented",
}

#: Response header naming the ignored fields.
HEADER = "x-kubeinfer-ignored-fields"
#: Where a route leaves the ignored field names for the header (``request.state``).
STATE_KEY = "ignored_fields"
#: Most distinct field names used as metric labels and logged, per process (the rest are ``other``).
MAX_DISTINCT_NAMES = 64
#: Most field names one response's header names (the rest are ``other``).
MAX_HEADER_NAMES = 32
#: What a field name must look like to be reported by name.
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_seen: set[str] = set()
_seen_lock = threading.Lock()


def _refuse_if_active(name: str, value: Any, path: str, defaults: dict[str, Any] | None) -> bool:
    """Raise for a field of :data:`REFUSED` set to something other than "off"; True when it is one."""
    if defaults and name in defaults and value == defaults[name]:
        return True
    if name not in REFUSED:
        return False
    if any(value == ok for ok in REFUSED[name]):
        return True
    hint = _HINTS.get(name)
    raise APIError(400, f"{name} is not supported by this server" + (f" ({hint})" if hint else ""),
                   param=path, code="unsupported_parameter")


def unknown_fields(body: BaseModel, *, defaults: dict[str, Any] | None = None, prefix: str = "",
                   path: str = "") -> list[str]:
    """The undeclared fields of ``body`` (and of its nested request models) that may be ignored.

    Args:
        body: a parsed request (or nested part) whose model keeps extra fields.
        defaults: extra fields accepted at exactly these values (route-specific defaults, such
            as vLLM's ``add_special_tokens``); other values are refused.
        prefix: the path of ``body`` in the request with list indexes, for the error's
            ``param`` (e.g. ``messages[2].``).
        path: the same without list indexes, for the returned names (e.g. ``messages.``).

    Returns:
        the ignorable fields' paths without list indexes (``metadata``, ``messages.mood``), each once.

    Raises:
        APIError: 400 ``unsupported_parameter`` naming a field of :data:`REFUSED` (top level only)
            set to a value other than off.
    """
    out: list[str] = []
    for name, value in (body.model_extra or {}).items():
        if not prefix and _refuse_if_active(name, value, name, defaults):
            continue
        if path + name not in out:
            out.append(path + name)
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel) and item.model_config.get("extra") == "allow":
                where = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                for found in unknown_fields(item, prefix=where, path=f"{path}{name}."):
                    if found not in out:
                        out.append(found)
    return out


def report_name(name: str) -> str:
    """The name an ignored field is reported under: itself, or ``other`` when it does not look like
    a field name."""
    return name if _NAME.match(name) else "other"


def metric_label(name: str) -> str:
    """The metric label of reported name ``name``: itself while fewer than :data:`MAX_DISTINCT_NAMES`
    names were seen in this process, else ``other``. Logs the first sighting of each labelled name
    at warning level."""
    with _seen_lock:
        if name in _seen or name == "other":
            return name
        if len(_seen) >= MAX_DISTINCT_NAMES:
            return "other"
        _seen.add(name)
    log.warning("ignoring request field %r: this server does not implement it (logged once per field name)", name)
    return name


def check_fields(request: Request, body: BaseModel, *, defaults: dict[str, Any] | None = None) -> list[str]:
    """Refuse output-changing unimplemented fields of ``body``; ignore and report the other unknown ones.

    Each ignored field is counted in ``kubeinfer_ignored_request_fields_total{field}`` and named in
    the response's :data:`HEADER` (through ``request.state``, which the app's header middleware reads).

    Args:
        request: the HTTP request (its state carries the names to the response header).
        body: the parsed request body.
        defaults: see :func:`unknown_fields`.

    Returns:
        the reported names of the ignored fields.

    Raises:
        APIError: 400 ``unsupported_parameter`` naming a refused field (see :func:`unknown_fields`).
    """
    return record_ignored(request, unknown_fields(body, defaults=defaults))


def record_ignored(request: Request, fields: list[str]) -> list[str]:
    """Report ``fields`` (paths) as ignored by this request: counted, logged once per name, and named
    in the response header (added to those already recorded).

    Returns:
        the reported names (:func:`report_name`) of everything this request ignored so far.
    """
    names: list[str] = list(getattr(request.state, STATE_KEY, None) or [])
    for field in fields:
        name = report_name(field)
        metrics.IGNORED_REQUEST_FIELDS.labels(field=metric_label(name)).inc()
        entry = name if name in names or len(names) < MAX_HEADER_NAMES else "other"
        if entry not in names:
            names.append(entry)
    if names:
        setattr(request.state, STATE_KEY, names)
    return names


def ignored_header(scope: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """The :data:`HEADER` entry for a response to ``scope``, or None when no field was ignored."""
    names = (scope.get("state") or {}).get(STATE_KEY)
    if not names:
        return None
    return HEADER.encode(), ",".join(names).encode("ascii")
