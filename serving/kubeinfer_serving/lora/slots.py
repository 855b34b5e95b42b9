"""The device slot pool of LoRA weights and a step's per-row application.

``max_loras`` slots, each holding one adapter padded to rank ``R = max_lora_rank``. Per decoder
layer and stacked module (``qkv``, ``o``, ``gate_up``, ``down``; see :mod:`.adapter`):

* ``A``: [S, n * R, in]: the n slices' A matrices stacked (q, k, v for ``qkv``), so one matmul
  shrinks a row for every slice (vLLM's "shrink" over stacked slices);
* ``B``: [S, out, R]: each slice's (scaled) B at its output rows, so slice i's rows expand
  from columns [i R, (i + 1) R) of the shrunk row ("expand").

Rows a slice or module does not adapt stay zero (they add nothing), as do the rank padding.

A step's rows are mapped to slots by :class:`LoRAStep` (slot -1: the base model alone). On CPU
the update is applied with plain torch ops, the segmented form of punica's SGMV (Chen et al.
2023, "Punica: Multi-Tenant LoRA Serving") with segments found by slot: the rows of each slot
present are gathered, shrunk by ``A^T``, expanded by ``B^T`` per slice and added back. When the
segments are of similar length (decode steps) they are padded to one [G, n, in] batch and run
as one ``bmm`` per half (a handful of operators whatever the number of adapters, which is what
costs on CPU at small shapes); otherwise (a long prefill chunk beside short rows) segment by
segment. On CUDA it is two Triton launches over all rows (:mod:`.triton_ops`).
"""

from __future__ import annotations

import numpy as np
import torch

from .adapter import STACKED_MODULES, TARGET_MODULES, LoRAAdapter, LoRAShapes


class LoRASlots:
    """``num_slots`` adapter slots of rank ``max_rank`` for every targetable module, on ``device``.

    Args:
        shapes: the base model's modules; num_slots: ``max_loras``; max_rank: ``max_lora_rank``.
        dtype, device: of the model.

    Attributes:
        a, b: per layer, stacked module -> the [S, n R, in] / [S, out, R] tensors (see the module docstring).
        nbytes: device bytes of all slots.
    """

    def __init__(self, shapes: LoRAShapes, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        self.shapes = shapes
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        for _ in range(shapes.num_layers):
            self.a.append({m: torch.zeros(num_slots, len(shapes.modules[m].slice_sizes) * max_rank,
                                          shapes.modules[m].in_features, dtype=dtype, device=device)
                           for m in STACKED_MODULES})
            self.b.append({m: torch.zeros(num_slots, shapes.modules[m].out_features, max_rank, dtype=dtype,
                                          device=device) for m in STACKED_MODULES})
        self.nbytes = sum(t.numel() * t.element_size() for layer in self.a + self.b for t in layer.values())

    @staticmethod
    def bytes_for(shapes: LoRAShapes, num_slots: int, max_rank: int, dtype: torch.dtype) -> int:
        """Device bytes a pool of these dimensions takes (for memory budgets before building it)."""
        elem = torch.empty((), dtype=dtype).element_size()
        per_layer = sum(len(s.slice_sizes) * max_rank * s.in_features + s.out_features * max_rank
                        for s in shapes.modules.values())
        return shapes.num_layers * per_layer * num_slots * elem

    @torch.inference_mode()
    def write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put ``adapter`` into ``slot`` (zeroing what it does not adapt)."""
        r_max = self.max_rank
        for layer in range(self.shapes.num_layers):
            for m in STACKED_MODULES:
                self.a[layer][m][slot].zero_()
                self.b[layer][m][slot].zero_()
        for (layer, target), (a, b) in adapter.weights.items():
            stacked, index = TARGET_MODULES[target]
            r = a.shape[0]
            first = self.shapes.modules[stacked].slice_offset(index)
            self.a[layer][stacked][slot, index * r_max:index * r_max + r].copy_(a)
            self.b[layer][stacked][slot, first:first + b.shape[0], :r].copy_(b)


class LoRAStep:
    """Which slot each row of a step uses, grouped for the per-slot update.

    Args:
        slots: the pool.
        row_slots: [T] int slot per row (-1: no adapter), on the host (None with ``row_slots_device``).
        device: where the step runs.
        use_triton: apply with the Triton kernels (:mod:`.triton_ops`); default: on CUDA.
        row_slots_device: the Triton path's [T] slots as a device tensor used as is (not copied;
            see :meth:`on_device`); default: a copy of ``row_slots``.

    Attributes:
        groups: (slot, row indexes [n] int64 on ``device`` or None for all rows) per slot present.
        kept: the same for the rows the last layer keeps (set by the model runner), or None.
        batched: whether the CPU path runs the segments as one padded batch (see the module docstring).
    """

    def __init__(self, slots: LoRASlots, row_slots: np.ndarray | None, device: torch.device,
                 use_triton: bool | None = None, row_slots_device: torch.Tensor | None = None) -> None:
        self.slots = slots
        self.row_slots = row_slots
        self.device = device
        self.use_triton = device.type == "cuda" if use_triton is None else use_triton
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        if self.use_triton:
            self.row_slots_device = (row_slots_device if row_slots_device is not None
                                     else torch.from_numpy(row_slots.astype(np.int32)).to(device))
            self.kept = None
            return
        present = np.unique(row_slots)
        host_rows = []
        for slot in present.tolist():
            if slot < 0:
                continue
            if present.size == 1:
                self.groups.append((slot, None))
            else:
                rows = np.flatnonzero(row_slots == slot)
                host_rows.append(rows)
                self.groups.append((slot, torch.from_numpy(rows).to(device)))
        self.kept: LoRAStep | None = None
        self.batched = False
        if len(host_rows) > 1:
            longest = max(len(r) for r in host_rows)
            if len(host_rows) * longest <= 2 * sum(len(r) for r in host_rows):
                self._batch(host_rows, longest)

    @classmethod
    def on_device(cls, slots: LoRASlots, row_slots_device: torch.Tensor) -> LoRAStep:
        """A Triton-path step whose per-row slots are the given device tensor, read when the kernels
        run (not copied): a decode CUDA graph captures it over its static inputs and replays it with
        whatever slots were written there (:mod:`kubeinfer_serving.engine.cuda_graphs`).

        Args:
            slots: the pool; row_slots_device: [T] int32 or int64 on the pool's device, -1 = none.

        No ``kept`` and no host grouping: for forwards that keep every row (decode graphs).
        """
        return cls(slots, None, row_slots_device.device, use_triton=True, row_slots_device=row_slots_device)

    def _batch(self, host_rows: list[np.ndarray], longest: int) -> None:
        """Lay the segments out as [G, longest] (padding repeats a segment's first row, masked to 0)."""
        self.batched = True
        count = len(host_rows)
        index = np.empty((count, longest), np.int64)
        mask = np.zeros((count, longest, 1), np.float32)
        for g, rows in enumerate(host_rows):
            index[g, :len(rows)] = rows
            index[g, len(rows):] = rows[0]
            mask[g, :len(rows)] = 1.0
        self._index = torch.from_numpy(index.reshape(-1)).to(self.device)
        self._mask = None if bool(mask.all()) else torch.from_numpy(mask).to(self.device, self.slots.dtype)
        slots = np.array([slot for slot, _ in self.groups])
        self._count, self._longest = count, longest
        self._slot_index = (None if np.array_equal(slots, np.arange(self.slots.num_slots))
                            else torch.from_numpy(slots).to(self.device))

    def select(self, rows: np.ndarray) -> LoRAStep:
        """The mapping of a subset of the rows (host indexes [R] into this step's rows)."""
        return LoRAStep(self.slots, self.row_slots[rows], self.device, self.use_triton)

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add each row's adapter update to ``y`` in place and return it.

        Args:
            layer: decoder layer index; module: ``qkv``, ``o``, ``gate_up`` or ``down``.
            x: [T, in] the module's input; y: [T, out] its base output (same rows).
        """
        a_all = self.slots.a[layer][module]
        b_all = self.slots.b[layer][module]
        shape = self.slots.shapes.modules[module]
        r_max = self.slots.max_rank
        if self.use_triton:
            from .triton_ops import lora_expand, lora_shrink

            shrunk = lora_shrink(x, a_all, self.row_slots_device)
            return lora_expand(shrunk, b_all, y, self.row_slots_device, shape.slice_sizes, r_max)
        if self.batched:
            return self._apply_batched(a_all, b_all, shape.slice_sizes, x, y)
        for slot, rows in self.groups:
            xs = x if rows is None else x.index_select(0, rows)
            shrunk = xs @ a_all[slot].t()  # [n, slices * R]
            b = b_all[slot]
            if len(shape.slice_sizes) == 1:
                delta = shrunk @ b.t()
            else:
                delta = torch.cat([shrunk[:, i * r_max:(i + 1) * r_max] @ b[off:off + size].t()
                                   for i, (off, size) in enumerate(_offsets(shape.slice_sizes))], dim=1)
            if rows is None:
                y += delta
            else:
                y.index_add_(0, rows, delta)
        return y

    def _apply_batched(self, a_all: torch.Tensor, b_all: torch.Tensor, slice_sizes: tuple[int, ...],
                       x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r_max = self.slots.max_rank
        a = a_all if self._slot_index is None else a_all.index_select(0, self._slot_index)
        b = b_all if self._slot_index is None else b_all.index_select(0, self._slot_index)
        xg = x.index_select(0, self._index).view(self._count, self._longest, x.shape[1])
        shrunk = torch.bmm(xg, a.transpose(1, 2))  # [G, n, slices * R]
        if self._mask is not None:
            shrunk.mul_(self._mask)
        if len(slice_sizes) == 1:
            delta = torch.bmm(shrunk, b.transpose(1, 2))
        else:
            delta = torch.cat([torch.bmm(shrunk[:, :, i * r_max:(i + 1) * r_max], b[:, off:off + size].transpose(1, 2))
                               for i, (off, size) in enumerate(_offsets(slice_sizes))], dim=2)
        y.index_add_(0, self._index, delta.view(-1, y.shape[1]))
        return y


def _offsets(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for s in sizes:
        out.append((pos, s))
        pos += s
    return out
