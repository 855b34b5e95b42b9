"""Linear layers with weights pre-packed for oneDNN on CPU.

``torch.nn.functional.linear`` on a float32 CPU tensor calls MKL's ``sgemm``, which re-packs
the weight matrix into its internal panel layout on every call. oneDNN (bundled with PyTorch)
can pack a weight once, ahead of time, into the blocked layout its AVX-512/AVX2 kernels read
(``torch.ops.mkldnn._reorder_linear_weight``), and then multiply against it directly
(``torch.ops.mkldnn._linear_pointwise``, the operator PyTorch's own Inductor CPU backend uses
for frozen linear weights). On the benchmark machine of this project (AMD EPYC, AVX-512,
one thread) that runs the tiny model's projections at about twice MKL's GFLOP/s, for every
batch size from a single decode row to a 2048-token prefill chunk.

The result is the same float32 product, with a different summation order than MKL: values
differ from ``F.linear`` by a few units in the last place (about 1e-6 relative).

:func:`pack_linear_layers` swaps every ``nn.Linear`` of a CPU float32 model for a
:class:`PackedLinear` that keeps the original parameter (same name, same tensor, so state
dicts and weight loading are unchanged) and holds the packed copy next to it; the packed copy
is rebuilt when the parameter is written in place (its version counter changes).
``KUBEINFER_CPU_PACKED_LINEAR=0`` turns the packing off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

#: Environment variable that turns packed oneDNN linear layers on CPU off ("0") or on ("1", the default).
PACKED_LINEAR_ENV = "KUBEINFER_CPU_PACKED_LINEAR"


def packed_linear_available() -> bool:
    """True when this PyTorch build has oneDNN with the packed-weight linear operators."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def use_packed_linear(weight: torch.Tensor) -> bool:
    """True when :func:`pack_linear_layers` packs a layer with this weight: float32 on CPU,
    oneDNN available, and ``KUBEINFER_CPU_PACKED_LINEAR`` not "0"."""
    if os.environ.get(PACKED_LINEAR_ENV, "1") == "0":
        return False
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and packed_linear_available()


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose forward multiplies by a oneDNN-packed copy of the weight (CPU, float32).

    Build it with :meth:`from_linear`. ``weight`` and ``bias`` stay ordinary parameters (the
    same tensors as the wrapped layer's); the packed copy (an opaque ``torch._mkldnn`` tensor of
    the same shape) is made on first use and remade whenever ``weight`` was modified in place.
    Input [..., in_features] float32 -> [..., out_features] float32, any number of rows.
    """

    _packed: torch.Tensor | None
    _packed_version: int

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> PackedLinear:
        """A PackedLinear sharing ``layer``'s weight and bias tensors (no copy of the parameters)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight = layer.weight
        new.bias = layer.bias
        new._packed = None
        new._packed_version = -1
        return new

    def _pack(self) -> torch.Tensor:
        version = self.weight._version
        if self._packed is None or version != self._packed_version:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            self._packed_version = version
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [..., out_features]; falls back to ``F.linear`` off CPU float32."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        packed = self._pack()
        lead = x.shape[:-1]
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), packed, self.bias,
                                                 "none", [], "")
        return out.view(*lead, self.out_features)


def packed_weight_bytes(model: nn.Module) -> int:
    """Host bytes of the packed weight copies :func:`pack_linear_layers` made in ``model``
    (oneDNN's own size of each blocked tensor; 0 when nothing was packed)."""
    return sum(torch.ops.mkldnn._nbytes(m._packed) for m in model.modules()
               if isinstance(m, PackedLinear) and m._packed is not None)


def pack_linear_layers(model: nn.Module) -> int:
    """Replace each ``nn.Linear`` of ``model`` whose weight qualifies (:func:`use_packed_linear`)
    by a :class:`PackedLinear` sharing its parameters; pack the weights now.

    Returns:
        how many layers were replaced (0 when the model is not float32 on CPU or oneDNN is off).
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and use_packed_linear(child.weight):
                packed = PackedLinear.from_linear(child)
                packed._pack()
                setattr(parent, name, packed)
                count += 1
    return count
