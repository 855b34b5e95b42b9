"""An opt-in exact-match cache of complete responses, for deterministic requests only.

A model opts in with ``resultCache: true`` in the catalogue (``--result-cache`` in single-model
mode); it is off by default. Only requests whose output is fully determined by the request are
cached: greedy ones (``temperature: 0``) and seeded ones (``seed`` set, every choice samples
with its own generator). The key is a SHA-256 over the route, the tenant, the model, the
engine instance (a reloaded model starts with an empty cache: entries of the old instance can
never match again and age out) and the request body without the fields that do not change the
output (``stream``, ``stream_options``, ``user``), serialized with sorted keys.

Entries live in a ``cachetools.TTLCache`` sized by their JSON length in bytes: least recently
used ones are evicted to stay within ``max_bytes`` and each expires ``ttl_seconds`` after it was
stored (reads do not extend it). A hit answers without touching the engine: the stored body gets a new ``id``
and ``created``, ``usage.result_cache_hit: true`` and the header ``X-Kubeinfer-Result-Cache:
hit``; a stream replays everything the stored answer holds (:func:`replay`: texts in chunks of
``REPLAY_CHARS`` characters, log-probabilities, tool calls, finish reasons), then the usage
chunk when asked, then ``[DONE]``. Responses are stored from non-streaming requests.
``kubeinfer_result_cache_requests_total{model_name,outcome}`` counts hits and misses.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from cachetools import TTLCache

from kubeinfer_serving import metrics
from kubeinfer_serving.api.sse import DONE, sse_event

#: Characters of text per replayed stream chunk.
REPLAY_CHARS = 16
#: Response header saying whether the result cache answered.
HEADER = "X-Kubeinfer-Result-Cache"
_IGNORED_FIELDS = {"stream", "stream_options", "user"}


def is_deterministic(body: Any) -> bool:
    """True when the request's output depends only on the request: greedy, or seeded."""
    return body.temperature == 0 or body.seed is not None


class ResultCache:
    """LRU cache of response bodies bounded in bytes, with a TTL (a ``cachetools.TTLCache``).

    Args:
        max_bytes: most bytes of stored JSON (0 disables storing).
        ttl_seconds: how long an entry may answer after it was stored, in seconds.
        models: the names of the models that opted in.
    """

    def __init__(self, max_bytes: int, ttl_seconds: float, models: set[str]) -> None:
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.models = set(models)
        # Values are (JSON size in bytes, body); the cache sums the sizes against max_bytes.
        self._entries: TTLCache[str, tuple[int, dict[str, Any]]] = TTLCache(
            maxsize=max_bytes, ttl=ttl_seconds, timer=time.monotonic, getsizeof=lambda entry: entry[0])

    @property
    def bytes(self) -> int:
        """Bytes of JSON held by entries that have not expired."""
        self._entries.expire()
        return int(self._entries.currsize)

    def key(self, route: str, tenant: str, model: str, engine_id: str, body: Any) -> str | None:
        """The cache key of a request, or None when it must not be cached (model not opted in, not deterministic)."""
        if model not in self.models or self.max_bytes <= 0 or not is_deterministic(body):
            return None
        fields = body.model_dump(mode="json", exclude=_IGNORED_FIELDS)
        text = json.dumps([route, tenant, model, engine_id, fields], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, key: str, model: str) -> dict[str, Any] | None:
        """A fresh copy of the stored body for ``key``, marked as a hit; None on a miss (absent or expired)."""
        entry = self._entries.get(key)  # a hit becomes the most recently used entry
        metrics.RESULT_CACHE_BYTES.set(self.bytes)
        if entry is None:
            metrics.RESULT_CACHE_REQUESTS.labels(model_name=model, outcome="miss").inc()
            return None
        metrics.RESULT_CACHE_REQUESTS.labels(model_name=model, outcome="hit").inc()
        body = copy.deepcopy(entry[1])
        prefix = "chatcmpl" if body.get("object") == "chat.completion" else "cmpl"
        body["id"] = f"{prefix}-{uuid.uuid4().hex}"
        body["created"] = int(time.time())
        usage = body.get("usage") or {}
        usage["result_cache_hit"] = True
        body["usage"] = usage
        return body

    def put(self, key: str, body: dict[str, Any]) -> None:
        """Store ``body`` (evicting least recently used entries to fit); bodies over the budget are skipped."""
        size = len(json.dumps(body, separators=(",", ":")))
        if size > self.max_bytes:
            return
        self._entries[key] = (size, body)
        metrics.RESULT_CACHE_BYTES.set(self.bytes)


def _tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stream deltas of stored tool calls, as the live stream sends them: per call one delta
    with its id, type and name, then one with its arguments."""
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        out.append({"index": i, "id": call.get("id"), "type": "function",
                    "function": {"name": fn.get("name"), "arguments": ""}})
        out.append({"index": i, "function": {"arguments": fn.get("arguments", "")}})
    return out


def replay(body: dict[str, Any], include_usage: bool, continuous_usage: bool = False) -> Iterator[str]:
    """SSE events replaying a stored completion or chat body, ending with ``[DONE]``.

    Each choice's text comes in :data:`REPLAY_CHARS`-character pieces; the first piece carries
    the choice's whole ``logprobs``; a chat choice's tool calls follow as the live stream sends
    them, then its ``finish_reason``. With ``continuous_usage`` every event carries the stored usage.
    """
    chat = body.get("object") == "chat.completion"
    base = {"id": body["id"], "created": body["created"], "model": body["model"],
            "system_fingerprint": body.get("system_fingerprint")}
    obj = "chat.completion.chunk" if chat else "text_completion"

    if continuous_usage:
        base["usage"] = body.get("usage")

    def event(choice: dict[str, Any]) -> str:
        return sse_event({**base, "object": obj, "choices": [choice]})

    if chat:
        yield sse_event({**base, "object": obj, "choices": [
            {"index": c["index"], "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for c in body["choices"]]})
    for choice in body["choices"]:
        index, reason, logprobs = choice["index"], choice.get("finish_reason"), choice.get("logprobs")
        text = (choice["message"].get("content") if chat else choice["text"]) or ""
        pieces = [text[i:i + REPLAY_CHARS] for i in range(0, len(text), REPLAY_CHARS)]
        if not chat:
            for n, piece in enumerate(pieces or [""]):
                last = n == max(len(pieces) - 1, 0)
                yield event({"index": index, "text": piece, "logprobs": logprobs if n == 0 else None,
                             "finish_reason": reason if last else None})
            continue
        for n, piece in enumerate(pieces):
            yield event({"index": index, "delta": {"content": piece}, "logprobs": logprobs if n == 0 else None,
                         "finish_reason": None})
        if not pieces and logprobs is not None:
            yield event({"index": index, "delta": {}, "logprobs": logprobs, "finish_reason": None})
        for delta in _tool_call_deltas(choice["message"].get("tool_calls") or []):
            yield event({"index": index, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None})
        yield event({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
    if include_usage:
        yield sse_event({**base, "object": obj, "choices": [], "usage": body.get("usage")})
    yield DONE
