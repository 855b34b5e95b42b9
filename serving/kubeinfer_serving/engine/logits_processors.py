"""Per-request logits processors, applied to the whole batch at once before sampling.

What each does follows vLLM's ``SamplingParams`` (and OpenAI's API reference for the
penalties and ``logit_bias``), in vLLM's order:

0. A grammar (structured outputs): the matcher's token bitmask (one bit per token, 32 per
   int32 word) is built on the host for the rows with a grammar, copied to the device in one
   [R, ceil(V / 32)] tensor and unpacked there; tokens with a 0 bit get ``-inf``.
1. ``allowed_token_ids``: every other token gets ``-inf``.
2. ``bad_words_token_ids``: the last token of a banned sequence gets ``-inf`` when the output
   ends with the sequence's other tokens (always, for a one-token sequence).
3. ``min_tokens``: EOS and ``stop_token_ids`` get ``-inf`` while the output is shorter.
4. ``logit_bias``: added to the named tokens' logits.
5. Penalties: ``repetition_penalty`` (CTRL, Keskar et al. 2019: a positive logit is divided
   by it, a negative one multiplied, for tokens in the prompt or the output), then
   ``frequency_penalty * count`` and ``presence_penalty * (count > 0)`` subtracted, counts
   over the output tokens.

The host builds flat (row, token id) index tensors for the rows that use a processor (sizes
proportional to their bans, biases and token histories, never to the vocabulary) and copies
them to the device without waiting; the vocabulary-wide work is a few batched tensor operations. The
host never reads anything back from the device here.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams
from .sequence import Sequence


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a host tensor) on ``device`` without blocking the host: pinned, then copied non-blocking.

    A copy from pageable memory would make the host wait for the queued forward pass.
    """
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _banned_and_bias(seqs: list[Sequence]) -> tuple[list[int], list[int], list[int], list[int], list[float]]:
    """Host-side lists: (ban rows, ban token ids, bias rows, bias token ids, bias values)."""
    ban_r: list[int] = []
    ban_t: list[int] = []
    bias_r: list[int] = []
    bias_t: list[int] = []
    bias_v: list[float] = []
    for row, seq in enumerate(seqs):
        p = seq.params
        out = seq.output_token_ids
        for word in p.bad_words_token_ids:
            prefix = word[:-1]
            if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix):] == prefix):
                ban_r.append(row)
                ban_t.append(word[-1])
        if len(out) < p.min_tokens:
            ban_r.extend([row] * len(seq.min_tokens_stop_ids))
            ban_t.extend(seq.min_tokens_stop_ids)
        for tok, value in p.logit_bias.items():
            bias_r.append(row)
            bias_t.append(tok)
            bias_v.append(value)
    return ban_r, ban_t, bias_r, bias_t, bias_v


def _allowed_ids(params: SamplingParams) -> torch.Tensor:
    """``params.allowed_token_ids`` as an int64 CPU tensor, built once per request (cached on ``params``):
    a list of 200k ids costs tens of milliseconds to convert, which must not recur at every step."""
    cached = params.__dict__.get("_allowed_ids_tensor")
    if cached is None:
        cached = torch.tensor(params.allowed_token_ids, dtype=torch.int64)
        params.__dict__["_allowed_ids_tensor"] = cached
    return cached


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], masks: list[bytes]) -> None:
    """Set to ``-inf`` the logits of tokens whose bit is 0 in their row's mask (in place).

    Args:
        logits: [B, V] float32.
        rows: the R rows that have a mask.
        masks: R byte strings of ``4 * ceil(V' / 32)`` bytes: little-endian int32 words, bit
            ``i % 32`` of word ``i // 32`` set when token ``i`` is allowed. ``V'`` may differ from
            ``V``: tokens beyond the mask are banned, mask bits beyond ``V`` ignored.
    """
    device = logits.device
    vocab = logits.shape[-1]
    words = len(masks[0]) // 4
    host = torch.frombuffer(bytearray(b"".join(masks)), dtype=torch.int32).view(len(rows), words)
    packed = _to_device(host, device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).view(len(rows), words * 32).bool()
    if words * 32 < vocab:
        bits = torch.cat([bits, bits.new_zeros((len(rows), vocab - words * 32))], dim=1)
    keep = bits[:, :vocab]
    row_idx = _to_device(torch.tensor(rows, dtype=torch.int64), device)
    logits[row_idx] = logits[row_idx].masked_fill(~keep, float("-inf"))


def apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Apply each row's processors (see the module docstring) to ``logits``.

    Args:
        logits: [B, V] float32 next-token logits, one row per sequence of ``seqs``; modified
            in place when a processor applies.
        seqs: the B sequences, in row order (their params, prompt and output so far).

    Returns:
        [B, V] float32 logits (the same tensor); unchanged when no row uses a processor.
    """
    if not any(s.params.uses_processors for s in seqs):
        return logits
    device = logits.device
    vocab = logits.shape[-1]

    def dev(t: torch.Tensor) -> torch.Tensor:
        return _to_device(t, device)

    guided = [row for row, s in enumerate(seqs) if s.matcher is not None]
    if guided:
        apply_token_bitmask(logits, guided, [seqs[r].matcher.compute_bitmask() for r in guided])

    allowed = [(row, _allowed_ids(s.params)) for row, s in enumerate(seqs) if s.params.allowed_token_ids is not None]
    if allowed:
        rows = [r for r, _ in allowed]
        keep = torch.zeros((len(allowed), vocab), dtype=torch.bool, device=device)
        for i, (_, ids) in enumerate(allowed):
            keep[i, dev(ids)] = True
        row_idx = dev(torch.tensor(rows, dtype=torch.int64))
        logits[row_idx] = logits[row_idx].masked_fill(~keep, float("-inf"))

    ban_r, ban_t, bias_r, bias_t, bias_v = _banned_and_bias(seqs)
    if ban_r:
        logits[dev(torch.tensor(ban_r)), dev(torch.tensor(ban_t))] = float("-inf")
    if bias_r:
        logits.index_put_((dev(torch.tensor(bias_r)), dev(torch.tensor(bias_t))),
                          dev(torch.tensor(bias_v, dtype=logits.dtype)), accumulate=True)

    pen = [row for row, s in enumerate(seqs) if s.params.uses_penalties]
    if pen:
        # Token counts of the outputs (and prompt+output presence for repetition) as flat
        # (row, token) index lists: one host->device copy each, no padding, no per-row tensors.
        out_r = [i for i, r in enumerate(pen) for _ in seqs[r].output_token_ids]
        out_t = [t for r in pen for t in seqs[r].output_token_ids]
        counts = torch.zeros((len(pen), vocab), dtype=logits.dtype, device=device)
        if out_t:
            counts.index_put_((dev(torch.tensor(out_r)), dev(torch.tensor(out_t))),
                              torch.ones(len(out_t), dtype=logits.dtype, device=device), accumulate=True)
        row_idx = dev(torch.tensor(pen, dtype=torch.int64))
        sub = logits[row_idx]
        rep = [seqs[r].params.repetition_penalty for r in pen]
        if any(x != 1.0 for x in rep):
            seen_r = [i for i, r in enumerate(pen) for _ in seqs[r].prompt_token_ids] + out_r
            seen_t = [t for r in pen for t in seqs[r].prompt_token_ids] + out_t
            factor = torch.ones((len(pen), vocab), dtype=logits.dtype, device=device)
            rep_d = dev(torch.tensor(rep, dtype=logits.dtype)).unsqueeze(1)
            seen = torch.zeros((len(pen), vocab), dtype=torch.bool, device=device)
            seen[dev(torch.tensor(seen_r)), dev(torch.tensor(seen_t))] = True
            # CTRL: positive logits divided by the penalty, negative ones multiplied.
            factor = torch.where(seen, torch.where(sub > 0, 1.0 / rep_d, rep_d), factor)
            sub.mul_(factor)
        freq = dev(torch.tensor([seqs[r].params.frequency_penalty for r in pen], dtype=logits.dtype)).unsqueeze(1)
        pres = dev(torch.tensor([seqs[r].params.presence_penalty for r in pen], dtype=logits.dtype)).unsqueeze(1)
        sub.sub_(freq * counts).sub_(pres * (counts > 0).to(logits.dtype))
        logits[row_idx] = sub
    return logits
