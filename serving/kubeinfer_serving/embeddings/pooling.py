"""Sentence-transformers pooling read from a model directory, applied to token embeddings.

A sentence-transformers directory lists its pipeline in ``modules.json``: the Transformer, a
``Pooling`` module (its ``config.json`` says which pooling: CLS token, mean, max, or mean
divided by sqrt(length)), and optionally ``Normalize`` (L2). The formulas follow
sentence-transformers' ``models.Pooling`` (Reimers & Gurevych, 2019, "Sentence-BERT").
A plain Hugging Face encoder without ``modules.json`` gets mean pooling, as
sentence-transformers does for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kubeinfer_serving.models.loader import ModelLoadError, UnsupportedModelError

_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_ST_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class PoolingConfig:
    """How token embeddings become one sentence vector.

    Attributes:
        mode: "cls", "mean", "max" or "mean_sqrt_len".
        normalize: L2-normalise the pooled vector.
        max_seq_length: tokens the model accepts per input (sentence_bert_config.json), or None.
    """

    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None


def read_pooling_config(model_dir: str | Path) -> PoolingConfig:
    """Read modules.json, the Pooling module's config.json and sentence_bert_config.json.

    Raises:
        ModelLoadError: an unreadable JSON file.
        UnsupportedModelError: a module other than Transformer/Pooling/Normalize (e.g. Dense),
            or a pooling mode that is not exactly one of the four above.
    """
    d = Path(model_dir)

    def read(p: Path) -> object:
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {p}: {exc}") from exc

    max_len = None
    if (d / "sentence_bert_config.json").is_file():
        max_len = read(d / "sentence_bert_config.json").get("max_seq_length")
    if not (d / "modules.json").is_file():
        return PoolingConfig("mean", False, max_len)
    mode, normalize = "mean", False
    for module in read(d / "modules.json"):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _ST_MODULES:
            raise UnsupportedModelError(f"sentence-transformers module {module.get('type')!r} in {d} is not supported")
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            cfg = read(d / module.get("path", "") / "config.json")
            on = [name for key, name in _MODES.items() if cfg.get(key)]
            unknown = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _MODES]
            if len(on) != 1 or unknown:
                raise UnsupportedModelError(f"pooling config in {d} must enable exactly one of {sorted(_MODES)}")
            mode = on[0]
    return PoolingConfig(mode, normalize, max_len)


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """Pool token embeddings into sentence embeddings.

    Args:
        token_embeddings: [B, T, H] float last hidden states.
        attention_mask: [B, T] 1 for real tokens, 0 for padding.
        config: the pooling mode and normalisation.

    Returns:
        [B, H] float32 sentence embeddings (unit L2 norm when ``config.normalize``).
    """
    x = token_embeddings.float()
    mask = attention_mask.to(x.dtype).unsqueeze(-1)
    if config.mode == "cls":
        out = x[:, 0]
    elif config.mode == "max":
        out = x.masked_fill(mask == 0, -1e9).max(dim=1).values
    else:
        summed = (x * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        out = summed / counts if config.mode == "mean" else summed / counts.sqrt()
    if config.normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=1)
    return out
