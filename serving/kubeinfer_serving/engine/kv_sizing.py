"""How big a model's KV pool is: one rule, plus the profiling forward pass that feeds it on CUDA.

The rule (:func:`size_kv_pool`) is a pure function of byte counts, the method of vLLM's GPU
worker (``determine_available_memory`` after ``profile_run``): of the pod's memory budget, what
is left for this model's KV pool is

    available = budget - other models' reservations - this model's weights - its activation peak

and the pool takes

* ``requested_bytes`` (a catalogue ``kvCacheBytes``) or ``fraction`` x budget (``kvCacheFraction``)
  when the model asks for a size: it must fit in ``available``, else the load fails;
* otherwise ("auto") ``available // share`` (``share``: how many auto-sized models are still to
  come, this one included), or at most ``fallback_bytes`` when the activation peak could not be
  measured (CPU, see below);

rounded down to whole blocks and capped at ``max_blocks`` (what ``maxNumSeqs`` sequences of
``maxModelLen`` tokens can ever use). Fewer than one block is an error naming every number.

The activation peak (:func:`profile_activation_peak`) is measured on CUDA only: one forward pass
and sampling step over ``max_num_batched_tokens`` dummy tokens split over up to
``max_num_seqs`` prefill sequences, with ``torch.cuda.reset_peak_memory_stats`` before and
``torch.cuda.max_memory_allocated`` after (the bytes above what was allocated before the pass).
torch's CPU allocator keeps no such statistics, so on CPU the peak is not measured (None): it
counts as 0 bytes, and an auto pool is ``fallback_bytes`` (the catalogue's ``kvCacheBytes``
default, 256 MiB) capped by what is left, instead of everything that is left (which on CPU would
be most of the machine's RAM).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

MiB = 1024 * 1024


class KVPoolSizeError(MemoryError):
    """The model's KV pool does not fit in what the memory budget has left (the message has the numbers)."""


def _fmt(n: int) -> str:
    """Bytes as MiB with two decimals (and the exact count)."""
    return f"{n / MiB:.2f} MiB ({n} B)"


@dataclass(frozen=True)
class KVSizing:
    """The outcome of :func:`size_kv_pool`, with every input, for logs and ``/v1/models`` messages.

    Attributes:
        num_blocks: KV pool size in blocks (>= 1).
        kv_bytes: ``num_blocks * block_bytes``.
        rule: ``"kvCacheBytes"``, ``"kvCacheFraction"``, ``"auto"`` (share of what is left) or
            ``"auto-cpu"`` (the fallback size, capped by what is left).
        budget_bytes, weights_bytes, others_bytes, block_bytes: as passed.
        activation_bytes: the measured peak, or None when not measured (counted as 0).
        available_bytes: budget - others - weights - activation (may be negative).
        share: the divisor of an auto pool.
        capped: the pool was cut to ``max_blocks``.
    """

    num_blocks: int
    kv_bytes: int
    rule: str
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int | None
    others_bytes: int
    available_bytes: int
    block_bytes: int
    share: int = 1
    capped: bool = False

    @property
    def reserved_bytes(self) -> int:
        """What the model holds against the budget: weights + activation peak + KV pool."""
        return self.weights_bytes + (self.activation_bytes or 0) + self.kv_bytes

    def describe(self, name: str) -> str:
        """One log line: the pool and the arithmetic that led to it."""
        act = _fmt(self.activation_bytes) if self.activation_bytes is not None else "not measured (cpu, counted as 0)"
        how = {"kvCacheBytes": "asked by kvCacheBytes", "kvCacheFraction": "asked by kvCacheFraction",
               "auto": f"1/{self.share} of what is left", "auto-cpu": "the cpu default, capped by what is left"}
        return (f"KV pool of {name}: {self.num_blocks} blocks x {self.block_bytes} B = {_fmt(self.kv_bytes)} "
                f"({how[self.rule]}{', capped at maxNumSeqs x maxModelLen' if self.capped else ''}); "
                f"budget {_fmt(self.budget_bytes)} - other models {_fmt(self.others_bytes)} - weights "
                f"{_fmt(self.weights_bytes)} - activation peak {act} = {_fmt(self.available_bytes)} available")


def size_kv_pool(
    *,
    budget_bytes: int,
    weights_bytes: int,
    activation_bytes: int | None,
    others_bytes: int,
    block_bytes: int,
    max_blocks: int,
    requested_bytes: int | None = None,
    fraction: float | None = None,
    share: int = 1,
    fallback_bytes: int | None = None,
    name: str = "model",
) -> KVSizing:
    """Size one model's KV pool (the rule is in the module docstring).

    Args:
        budget_bytes: the pod's budget for all models (``memoryBudgetBytes`` or
            ``gpuMemoryUtilization`` x device memory), bytes.
        weights_bytes: this model's weights on the device, bytes.
        activation_bytes: this model's measured activation peak, bytes; None: not measured (0).
        others_bytes: what the other loaded or loading models hold against the budget, bytes.
        block_bytes: bytes of one KV block over all layers (K and V).
        max_blocks: most blocks the model can use (``maxNumSeqs`` x blocks of ``maxModelLen``).
        requested_bytes: an explicit pool size (``kvCacheBytes``); exclusive with ``fraction``.
        fraction: pool = ``fraction`` x ``budget_bytes`` (``kvCacheFraction``), in (0, 1].
        share: an auto pool takes ``available // share``.
        fallback_bytes: an auto pool's size when ``activation_bytes`` is None (CPU).
        name: the model, for messages.

    Returns:
        :class:`KVSizing`.

    Raises:
        ValueError: both ``requested_bytes`` and ``fraction``, a fraction outside (0, 1],
            ``block_bytes``/``max_blocks``/``share`` < 1.
        KVPoolSizeError: an asked-for pool larger than what is available, or less than one
            block available for an auto pool; the message names budget, weights, activation
            peak, other models and the pool.
    """
    if requested_bytes is not None and fraction is not None:
        raise ValueError("kvCacheBytes and kvCacheFraction are exclusive")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"kvCacheFraction must be in (0, 1], got {fraction}")
    if block_bytes < 1 or max_blocks < 1 or share < 1:
        raise ValueError("block_bytes, max_blocks and share must be >= 1")
    available = budget_bytes - others_bytes - weights_bytes - (activation_bytes or 0)

    def sizing(blocks: int, rule: str, capped: bool) -> KVSizing:
        return KVSizing(blocks, blocks * block_bytes, rule, budget_bytes, weights_bytes, activation_bytes,
                        others_bytes, available, block_bytes, share, capped)

    if requested_bytes is not None or fraction is not None:
        rule = "kvCacheBytes" if requested_bytes is not None else "kvCacheFraction"
        wanted = requested_bytes if requested_bytes is not None else int(fraction * budget_bytes)  # type: ignore[operator]
        blocks = max(1, wanted // block_bytes)
        capped = blocks > max_blocks
        blocks = min(blocks, max_blocks)
        if blocks * block_bytes > available:
            raise KVPoolSizeError(
                f"the KV pool of {name} ({rule} {wanted} B: {blocks} blocks, {_fmt(blocks * block_bytes)}) does "
                f"not fit: budget {_fmt(budget_bytes)} - other models {_fmt(others_bytes)} - weights "
                f"{_fmt(weights_bytes)} - activation peak {_fmt(activation_bytes or 0)} leaves {_fmt(available)}")
        return sizing(blocks, rule, capped)
    rule = "auto" if activation_bytes is not None or fallback_bytes is None else "auto-cpu"
    wanted = max(available, 0) // share
    if rule == "auto-cpu":
        wanted = min(wanted, fallback_bytes)  # type: ignore[type-var]
    blocks = wanted // block_bytes
    if blocks < 1:
        raise KVPoolSizeError(
            f"no memory left for the KV pool of {name}: budget {_fmt(budget_bytes)} - other models "
            f"{_fmt(others_bytes)} - weights {_fmt(weights_bytes)} - activation peak "
            f"{_fmt(activation_bytes or 0)} leaves {_fmt(available)}"
            + (f", shared by {share} models" if share > 1 else "")
            + f"; one KV block needs {block_bytes} B")
    capped = blocks > max_blocks
    return sizing(min(blocks, max_blocks), rule, capped)


def profile_activation_peak(model: torch.nn.Module, *, max_num_batched_tokens: int, max_num_seqs: int,
                            max_model_len: int, block_size: int, device: torch.device) -> int | None:
    """Peak bytes one step at ``max_num_batched_tokens`` allocates on top of weights and KV (CUDA only).

    Runs the real step path (:class:`~kubeinfer_serving.engine.model_runner.ModelRunner`:
    input preparation, forward, logits, greedy sampling) over ``max_num_batched_tokens`` dummy
    prompt tokens (token id 0) split over ``min(max_num_seqs, tokens)`` prefill sequences of at
    most ``max_model_len`` tokens, with a temporary KV pool just large enough for them; the
    temporary pool is allocated before the peak statistics are reset, so it is not counted.

    Returns:
        bytes (``torch.cuda.max_memory_allocated`` after the pass minus
        ``torch.cuda.memory_allocated`` before it), or None on a non-CUDA device.
    """
    if device.type != "cuda":
        return None
    from .model_runner import ModelRunner
    from .sampling import SamplingParams
    from .scheduler import ScheduledSeq
    from .sequence import Sequence

    tokens = max(1, min(max_num_batched_tokens, max_num_seqs * max_model_len))
    num_seqs = max(1, min(max_num_seqs, tokens, max_num_batched_tokens))
    lens = [tokens // num_seqs + (1 if i < tokens % num_seqs else 0) for i in range(num_seqs)]
    lens = [min(n, max_model_len) for n in lens if n > 0]
    blocks_per = [-(-n // block_size) for n in lens]
    runner = ModelRunner(model, sum(blocks_per), block_size, device)
    scheduled, next_block = [], 0
    for i, (n, nb) in enumerate(zip(lens, blocks_per, strict=True)):
        seq = Sequence(f"profile-{i}", [0] * n, SamplingParams(max_tokens=1))
        seq.block_table = list(range(next_block, next_block + nb))
        next_block += nb
        scheduled.append(ScheduledSeq(seq, n, 0))
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    runner.run(scheduled)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    runner.release()
    del runner, scheduled
    gc.collect()
    torch.cuda.empty_cache()
    return max(0, int(peak))
