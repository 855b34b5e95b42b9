"""Tests of kubeinfer_serving.models: the tiny-model builder, loader and built-in models."""
