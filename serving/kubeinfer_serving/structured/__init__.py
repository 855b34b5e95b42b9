"""Structured outputs: grammars (JSON schema, regex, choice, Lark) compiled with llguidance.

Why llguidance rather than xgrammar (both are used by vLLM; compared at llguidance 1.9.1 and
xgrammar 0.2.8 from PyPI): llguidance is one abi3 wheel with no Python dependencies (xgrammar
needs apache-tvm-ffi and pulls triton), it builds a matcher in under a millisecond with no
per-grammar precomputation over the vocabulary (xgrammar compiles each grammar ahead of time,
which is the slow step it caches), computes masks lazily per step (tens of microseconds), and
covers JSON schema, regex and Lark grammars in one format. Its token mask is the same 32-bit
bitmask vLLM applies on the device.

:mod:`.grammar` turns request fields into grammars and compiles them (off the engine thread,
cached); the engine applies the masks (:mod:`kubeinfer_serving.engine.logits_processors`) and
advances the matchers, duck-typed, so the engine never imports llguidance.
"""

from kubeinfer_serving.structured.grammar import CompiledGrammar, GrammarCompiler, GrammarError, GrammarSpec

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarError", "GrammarSpec"]
