"""Grammar specs, their compilation with llguidance, and the per-tokenizer compile cache."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
from llguidance.gbnf_to_lark import gbnf_to_lark

#: JSON is generated compactly, as OpenAI's structured outputs are: fixed separators, no free
#: whitespace (a model with free whitespace can pad forever; vLLM exposes the same choice).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

#: Compiled grammars kept per tokenizer (least recently used dropped first).
CACHE_SIZE = 256
#: Grammar sources up to this many characters compile on their own worker, so a small grammar
#: never waits behind a large one.
SMALL_GRAMMAR_CHARS = 4096


class GrammarError(ValueError):
    """A grammar, schema or regex that cannot be compiled; the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match.

    Attributes:
        kind: ``json`` (a JSON schema, as canonical JSON text), ``json_object`` (any JSON
            object), ``regex``, ``choice`` (JSON list of strings: exactly one of them) or
            ``grammar`` (a Lark grammar, llguidance's dialect; GBNF is converted).
        source: the schema / pattern / choices / grammar text.
    """

    kind: str
    source: str

    def to_llguidance(self) -> str:
        """The llguidance grammar text of this spec.

        Raises:
            GrammarError: a bad JSON schema text or choice list.
        """
        m = llguidance.LLMatcher
        if self.kind == "json":
            try:
                schema = json.loads(self.source)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
            return m.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return m.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return m.grammar_from_regex(self.source)
        if self.kind == "choice":
            choices = json.loads(self.source)
            return m.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in choices))
        if self.kind == "grammar":
            text = self.source
            if "::=" in text:  # GBNF (llama.cpp's format, which vLLM's examples use)
                try:
                    text = gbnf_to_lark(text)
                except Exception as exc:  # noqa: BLE001 - the converter's errors are plain exceptions
                    raise GrammarError(f"the grammar is not valid GBNF: {exc}") from exc
            return m.grammar_from_lark(text)
        raise GrammarError(f"unknown grammar kind {self.kind!r}")


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "the grammar failed"


def _probe(template: llguidance.LLMatcher, eos_token: int) -> None:
    """Run a copy of a freshly compiled grammar for one token, so a grammar that cannot produce
    anything (an empty language such as ``start: start``) or that trips llguidance's limits at
    once (``a{1000000}``, deep recursion: "too many items") is a compile error, not a request
    that ends at once with text that does not match.

    Raises:
        GrammarError: the grammar failed on its first mask or first token (llguidance's reason).
    """
    probe = template.deep_copy()
    mask = probe.compute_bitmask()
    if probe.is_error():
        raise GrammarError(f"the grammar cannot produce any output: {_first_line(probe.get_error())}")
    words = memoryview(mask).cast("I")
    first = next((w * 32 + b for w, word in enumerate(words) if word for b in range(32)
                  if word >> b & 1 and w * 32 + b != eos_token), None)
    if first is None:
        return  # only the end is allowed: the empty output matches
    probe.consume_token(first)
    if not probe.is_error():
        probe.compute_bitmask()
    if probe.is_error():
        raise GrammarError(f"the grammar is beyond llguidance's limits: {_first_line(probe.get_error())}")


class CompiledGrammar:
    """A compiled grammar; :meth:`matcher` hands each request its own matcher.

    The matcher (``llguidance.LLMatcher``) is what the engine drives: ``compute_bitmask()``
    -> bytes (one bit per token, little-endian int32 words), ``consume_token(id)`` -> bool,
    ``is_stopped()``, ``is_error()``.
    """

    def __init__(self, template: llguidance.LLMatcher) -> None:
        self._template = template

    def matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start (a copy of the compiled one, microseconds)."""
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles grammar specs for one tokenizer, on a worker thread, with an LRU cache.

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        vocab_size: the model's vocabulary size (its logits' width; may exceed the tokenizer's).
        eos_token_ids: the tokens that end the output (the grammar allows them at its end).

    Use :func:`compiler_for` to share one per tokenizer.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int] | None = None) -> None:
        eos = eos_token_ids or None
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._small_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile-small")
        self.compilations = 0

    def _cached(self, spec: GrammarSpec) -> CompiledGrammar | None:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
            return hit

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec``, from the cache when it was compiled before.

        Raises:
            GrammarError: the grammar does not compile (message from llguidance).
        """
        hit = self._cached(spec)
        if hit is not None:
            return hit
        text = spec.to_llguidance()
        error = llguidance.LLMatcher.validate_grammar(text, self._tokenizer)
        if error:
            raise GrammarError(error)
        template = llguidance.LLMatcher(self._tokenizer, text, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        _probe(template, self._tokenizer.eos_token)
        compiled = CompiledGrammar(template)
        with self._lock:
            self.compilations += 1
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    async def compile_async(self, spec: GrammarSpec) -> CompiledGrammar:
        """:meth:`compile` on a worker thread (never on the event loop or the engine thread): a cache
        hit at once, sources up to :data:`SMALL_GRAMMAR_CHARS` on the small grammars' worker, the
        rest on the other. Cancelling the awaiting task drops a compilation that has not started."""
        hit = self._cached(spec)
        if hit is not None:
            return hit
        pool = self._small_pool if len(spec.source) <= SMALL_GRAMMAR_CHARS else self._pool
        return await asyncio.get_running_loop().run_in_executor(pool, self.compile, spec)


_compilers: weakref.WeakKeyDictionary[Any, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any, vocab_size: int, eos_token_ids: list[int] | None = None) -> GrammarCompiler:
    """The shared :class:`GrammarCompiler` of ``tokenizer`` (built on first use, ~0.1-1 s)."""
    with _compilers_lock:
        comp = _compilers.get(tokenizer)
        if comp is None:
            comp = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
            _compilers[tokenizer] = comp
        return comp
