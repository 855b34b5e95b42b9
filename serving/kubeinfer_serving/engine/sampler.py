"""Batched token sampling: greedy, temperature, min-p, top-k, top-p, per-request seeds.

Sampling uses the exponential-race form of the categorical draw (argmax of p / E with
E ~ Exp(1), the Gumbel-max trick in another guise), which needs no CPU-side loop and no
host sync for unseeded rows. Rows with a seed draw their noise from their own
``torch.Generator``, so a seeded request's tokens do not depend on what else is in the batch.

Everything runs on the logits' device: the parameters go up through pinned non-blocking
copies, and the only device-to-host transfer of a step is the sampled ids, which the model
runner fetches once through pinned double-buffered staging (:mod:`.staging`).

Seeded requests and CUDA graphs: a per-request generator's state cannot live inside a captured
graph (replay would repeat the same draws), so sampling is never captured. With CUDA graphs
(:mod:`.cuda_graphs`) only the model forward is replayed; this sampler then runs eagerly on its
output, seeded rows drawing their noise from their own generators (one small kernel per seeded
row) and all other rows from the device's default generator.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams


def _h2d(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [len(values)] tensor on ``device`` without blocking the host.

    ``torch.tensor(values, device=cuda)`` copies from pageable memory synchronously, so the host
    would wait for the queued forward pass; a pinned staging tensor copied with
    ``non_blocking=True`` does not. (The pinned tensor stays alive until the copy ran: the
    caching host allocator records the copy's stream.)
    """
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Mask logits below each row's k-th largest, without sorting the vocabulary.

    ``torch.topk`` selects the ``k_max`` largest of each row (a partial selection, not a
    full sort of V entries); row r keeps the logits >= the ``top_k[r]``-th of them. Tokens tied
    with the k-th value are all kept (vLLM's top-k-only path does the same).

    Args:
        logits: [B, V] float32, already divided by temperature.
        top_k: [B] int64, k per row; values >= V disable it.
        k_max: the largest k below V over the rows (host int, >= 1).

    Returns:
        [B, V] float32 logits with excluded tokens set to -inf.
    """
    vocab = logits.shape[-1]
    top = logits.topk(k_max, dim=-1).values
    kth = top.gather(1, (top_k.clamp(1, k_max) - 1).unsqueeze(1))
    kth = kth.masked_fill((top_k >= vocab).unsqueeze(1), float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p (nucleus, Holtzman et al. 2020) sets.

    Args:
        logits: [B, V] float32, already divided by temperature.
        top_k: [B] int64, k per row; values >= V disable it.
        top_p: [B] float32 in (0, 1]; 1 disables it.

    Returns:
        [B, V] float32 logits with excluded tokens set to -inf (at least one token is kept).
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    mask = ranks >= top_k.clamp(1, vocab).unsqueeze(1)
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    # Keep a token while the mass before it is below top_p (so the top token is always kept).
    mass_before = probs.cumsum(dim=-1) - probs
    mask |= mass_before >= top_p.unsqueeze(1)
    mask[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens less likely than ``min_p`` times the row's most likely token (min-p sampling,
    Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"; vLLM's ``min_p``).

    Args:
        logits: [B, V] float32, already divided by temperature.
        min_p: [B] float32 in [0, 1]; 0 disables it.

    Returns:
        [B, V] float32 logits with excluded tokens set to -inf (the top token is always kept).
    """
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
    threshold = logits.max(dim=-1, keepdim=True).values + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: [B, V] float32 next-token logits.
        params: B sampling parameter sets, one per row.
        generators: B per-request generators (None for unseeded rows), on ``logits.device``.

    Returns:
        [B] int64 token ids on ``logits.device``.
    """
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_tokens
    device = logits.device
    vocab = logits.shape[-1]
    temps = _h2d([p.temperature if not p.greedy else 1.0 for p in params], torch.float32, device)
    scaled = logits / temps.unsqueeze(1)
    if any(p.min_p > 0.0 and not p.greedy for p in params):
        min_p = _h2d([p.min_p for p in params], torch.float32, device)
        scaled = apply_min_p(scaled, min_p)
    if any(p.top_p < 1.0 for p in params):
        top_k = _h2d([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], torch.int64, device)
        top_p = _h2d([p.top_p for p in params], torch.float32, device)
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    elif any(0 < p.top_k < vocab for p in params):  # top-k alone: a partial selection, no sort
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        scaled = apply_top_k(scaled, _h2d(ks, torch.int64, device), max(k for k in ks if k < vocab))
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None and not params[row].greedy:
            noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    is_greedy = _h2d([p.greedy for p in params], torch.bool, device)
    return torch.where(is_greedy, greedy_tokens, sampled)
