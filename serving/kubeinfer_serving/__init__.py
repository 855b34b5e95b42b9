"""kubeinfer serving pod: OpenAI-compatible HTTP API over a continuous-batching engine."""

__version__ = "0.1.0"
