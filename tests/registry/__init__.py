"""Tests of kubeinfer_serving.registry and the embedding runner."""
