"""The serving pod's HTTP API: OpenAI routes, errors, SSE, probes and the metrics endpoint.

Entry point: :func:`kubeinfer_serving.api.app.create_app` (``create_app(provider, *, settings)``).
"""
