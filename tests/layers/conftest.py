"""Fixtures of the layer tests."""

from tests.triton_fixture import triton_device  # noqa: F401
