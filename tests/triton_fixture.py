"""The ``triton_device`` fixture: where Triton kernels run in tests (a GPU, else Triton's CPU interpreter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def triton_device(monkeypatch) -> torch.device:
    """The device to run Triton kernels on: CUDA when present, else CPU under the interpreter.

    Without CUDA, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is
    imported. Works around triton-lang/triton#9171 (Triton 3.6 with NumPy >= 2.4): the
    interpreter's ``tensor.__index__`` calls ``int()`` on a 1-element 1-D array, which NumPy
    2.4 refuses, so a ``range()`` over a runtime bound fails; the patch uses the element.

    Raises (fails the test): no CUDA and the kernel was not defined under the interpreter.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    from kubeinfer_serving.layers import paged_attention_triton as mod
    from triton.runtime import interpreter

    if not isinstance(mod._paged_attention_kernel, interpreter.InterpretedFunction):
        pytest.fail("no CUDA and triton was imported without TRITON_INTERPRET=1; run with TRITON_INTERPRET=1")
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor)
    return torch.device("cpu")
