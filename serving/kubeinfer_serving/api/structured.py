"""Structured-output request fields -> one grammar spec, compiled off the event loop and the engine thread.

Accepted forms (one per request): OpenAI's ``response_format`` (``json_object``,
``json_schema`` with ``json_schema.schema``; ``text`` means none), vLLM's ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar``, and vLLM's newer
``structured_outputs`` object (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``).
Tool calling adds its own schema (:mod:`kubeinfer_serving.api.tools`).

JSON schemas forbid properties they do not declare (:func:`forbid_additional_properties`), as
vLLM's default backend (xgrammar) does and its ``guidance`` backend does with
``disable_additional_properties``; llguidance alone would admit any extra key where a schema
does not say ``additionalProperties: false``, so LangChain's and litellm's tool schemas (which
never say it) got calls with invented keys. The opt-out is vLLM's option name:
``structured_outputs.disable_additional_properties: false`` per request, or
``--structured-outputs-config '{"disable_additional_properties": false}'`` for the server.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request

from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.generation import until_disconnect
from kubeinfer_serving.api.schemas import _SamplingFields
from kubeinfer_serving.structured.grammar import CompiledGrammar, GrammarError, GrammarSpec, compiler_for

#: ``guided_decoding_backend`` / ``structured_outputs.backend`` values that name this server's library.
BACKENDS = {None, "auto", "guidance", "llguidance"}
#: Most choices of a ``guided_choice`` / ``structured_outputs.choice`` (OpenAI allows 500 enum values).
MAX_CHOICES = 1024
#: Longest grammar source (schema, pattern, choices, grammar or a forced tool call's schema), characters:
#: a compilation's time grows with it, and compilations share one worker per size class.
MAX_GRAMMAR_CHARS = 100_000


#: Keywords whose value is a map of name -> subschema.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
#: Keywords whose value is one subschema.
_SCHEMA_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedItems", "additionalItems")
#: Keywords whose value is a list of subschemas (``allOf``'s members are handled apart: see below).
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")


def forbid_additional_properties(schema: Any) -> Any:
    """A copy of JSON schema ``schema`` in which objects admit only the properties they declare.

    Every (sub)schema that declares ``properties`` or ``patternProperties`` and says nothing of
    ``additionalProperties`` / ``unevaluatedProperties`` gets ``additionalProperties: false``
    (what vLLM's ``guidance`` backend does with ``disable_additional_properties``,
    vllm/v1/structured_output/backend_guidance.py). Members of an ``allOf`` are left open, since
    closing each of them would make their conjunction refuse the others' properties (the
    ``allOf`` schema itself is closed when it declares properties). Free-form objects (no
    declared properties) stay free-form.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: forbid_additional_properties(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = forbid_additional_properties(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [forbid_additional_properties(sub) for sub in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_open(forbid_additional_properties(sub)) if isinstance(sub, dict) else sub
                        for sub in out["allOf"]]
    declares = "properties" in out or "patternProperties" in out
    if declares and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def _open(schema: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`forbid_additional_properties`'s own addition at the top of ``schema``."""
    if schema.get("additionalProperties") is False:
        schema = {k: v for k, v in schema.items() if k != "additionalProperties"}
    return schema


def forbids_additional_properties(request: Request, body: Any) -> bool:
    """Whether the request's JSON schemas forbid undeclared properties: its
    ``structured_outputs.disable_additional_properties`` when given, else the server's
    ``--structured-outputs-config`` (default true).

    Raises:
        APIError: 400 when the request's value is not a boolean.
    """
    so = getattr(body, "structured_outputs", None) or {}
    value = so.get("disable_additional_properties")
    if value is None:
        return request.app.state.settings.structured_outputs_config.disable_additional_properties
    if not isinstance(value, bool):
        raise APIError(400, "structured_outputs.disable_additional_properties must be true or false",
                       param="structured_outputs.disable_additional_properties", code="invalid_value")
    return value


def schema_text(value: Any, param: str, forbid_additional: bool = True) -> str:
    """A JSON schema (an object, or its JSON text) as canonical JSON text, closed to undeclared
    properties unless ``forbid_additional`` is false (:func:`forbid_additional_properties`).

    Raises:
        APIError: 400 naming ``param`` when ``value`` is not JSON or not a schema object.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"{param} is not valid JSON: {exc}", param=param, code="invalid_value") from exc
    if not isinstance(value, (dict, bool)):
        raise APIError(400, f"{param} must be a JSON schema object", param=param, code="invalid_value")
    if forbid_additional:
        value = forbid_additional_properties(value)
    return json.dumps(value, sort_keys=True)


def _choice(value: Any, param: str) -> GrammarSpec:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise APIError(400, f"{param} must be a non-empty list of non-empty strings", param=param,
                       code="invalid_value")
    if len(value) > MAX_CHOICES:
        raise APIError(400, f"{param} has {len(value)} choices; at most {MAX_CHOICES} are allowed", param=param,
                       code="invalid_value")
    return GrammarSpec("choice", json.dumps(value))


def _from_response_format(rf: dict[str, Any], forbid_additional: bool) -> GrammarSpec | None:
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                           param="response_format", code="invalid_value")
        return GrammarSpec("json", schema_text(js["schema"], "response_format", forbid_additional))
    raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                   param="response_format", code="unsupported_parameter")


def _from_structured_outputs(so: dict[str, Any], forbid_additional: bool) -> list[tuple[str, GrammarSpec]]:
    specs: list[tuple[str, GrammarSpec]] = []
    for key, value in so.items():
        if value is None or value is False or key == "disable_additional_properties":
            continue
        param = f"structured_outputs.{key}"
        if key == "json":
            specs.append((param, GrammarSpec("json", schema_text(value, param, forbid_additional))))
        elif key == "json_object":
            specs.append((param, GrammarSpec("json_object", "")))
        elif key == "regex":
            specs.append((param, GrammarSpec("regex", str(value))))
        elif key == "choice":
            specs.append((param, _choice(value, param)))
        elif key == "grammar":
            specs.append((param, GrammarSpec("grammar", str(value))))
        elif key == "backend":
            if value not in BACKENDS:
                raise APIError(400, f"{param} {value!r} is not available; this server uses llguidance",
                               param=param, code="unsupported_parameter")
        else:
            raise APIError(400, f"{param} is not supported by this server", param=param,
                           code="unsupported_parameter")
    return specs


def grammar_spec(body: _SamplingFields, forbid_additional: bool = True) -> tuple[str, GrammarSpec] | None:
    """The one structured-output constraint of ``body`` and the field it came from, or None.

    Args:
        forbid_additional: close JSON schemas to undeclared properties (:func:`forbids_additional_properties`).

    Raises:
        APIError: 400 naming the field for a malformed value, an unsupported form, or more than one constraint.
    """
    specs: list[tuple[str, GrammarSpec]] = []
    if body.response_format:
        spec = _from_response_format(body.response_format, forbid_additional)
        if spec is not None:
            specs.append(("response_format", spec))
    if body.guided_json is not None:
        specs.append(("guided_json", GrammarSpec("json", schema_text(body.guided_json, "guided_json",
                                                                     forbid_additional))))
    if body.guided_regex is not None:
        specs.append(("guided_regex", GrammarSpec("regex", body.guided_regex)))
    if body.guided_choice is not None:
        specs.append(("guided_choice", _choice(body.guided_choice, "guided_choice")))
    if body.guided_grammar is not None:
        specs.append(("guided_grammar", GrammarSpec("grammar", body.guided_grammar)))
    if body.structured_outputs:
        specs.extend(_from_structured_outputs(body.structured_outputs, forbid_additional))
    if body.guided_decoding_backend not in BACKENDS:
        raise APIError(400, f"guided_decoding_backend {body.guided_decoding_backend!r} is not available; this "
                       "server uses llguidance", param="guided_decoding_backend", code="unsupported_parameter")
    if body.guided_whitespace_pattern is not None:
        raise APIError(400, "guided_whitespace_pattern is not supported by this server (JSON is generated "
                       "compactly)", param="guided_whitespace_pattern", code="unsupported_parameter")
    if len(specs) > 1:
        names = ", ".join(p for p, _ in specs)
        raise APIError(400, f"only one structured-output constraint may be given, got {names}", param=specs[1][0],
                       code="invalid_value")
    return specs[0] if specs else None


async def compile_guide(request: Request, engine: Any, tokenizer: Any, spec: GrammarSpec,
                        param: str) -> CompiledGrammar:
    """Compile ``spec`` for the model of ``engine`` on a grammar worker thread (cached per tokenizer).

    A compilation whose client leaves while it waits for a worker is dropped (a running one
    finishes: llguidance cannot be interrupted, which :data:`MAX_GRAMMAR_CHARS` bounds).

    Args:
        request: the HTTP request (its disconnect abandons the compilation).
        engine: the served model's :class:`~kubeinfer_serving.engine.async_engine.AsyncLLMEngine`.
        tokenizer: its Hugging Face tokenizer.
        param: the request field named in errors.

    Raises:
        APIError: 400 naming ``param`` when the source is longer than :data:`MAX_GRAMMAR_CHARS` or
            the grammar, schema or regex does not compile.
        ClientDisconnected: the client left first.
    """
    if len(spec.source) > MAX_GRAMMAR_CHARS:
        raise APIError(400, f"{param} is {len(spec.source)} characters long as a grammar; at most "
                       f"{MAX_GRAMMAR_CHARS} are allowed", param=param, code="invalid_value")
    inner = engine.engine
    compiler = await asyncio.to_thread(compiler_for, tokenizer, inner.vocab_size, sorted(inner.eos_token_ids))
    try:
        return await until_disconnect(request, compiler.compile_async(spec))
    except GrammarError as exc:
        raise APIError(400, f"{param} could not be compiled: {exc}", param=param, code="invalid_value") from exc
