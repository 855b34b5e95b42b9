"""LoRA adapters made by PEFT on the built-in tiny model, and PEFT's reference outputs.

Each :class:`AdapterSpec` is turned into a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) by ``get_peft_model`` + ``save_pretrained`` with a fixed seed and
``init_lora_weights=False`` (so B is random, not zero: the adapter changes the output).
The reference is PEFT's merged model (``merge_and_unload``) run by transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter: name, seed, rank, alpha, targets, rsLoRA, PEFT's per-module patterns."""

    name: str
    seed: int
    r: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict, hash=False)
    alpha_pattern: dict = field(default_factory=dict, hash=False)


#: Several ranks and target sets, rsLoRA and per-module patterns included.
SPECS = (
    AdapterSpec("qv-r8", 1, 8, 16, ("q_proj", "v_proj")),
    AdapterSpec("all-r4", 2, 4, 8, ALL_TARGETS),
    AdapterSpec("mlp-o-r16-rslora", 3, 16, 32, ("o_proj", "gate_proj", "up_proj", "down_proj"), use_rslora=True),
    AdapterSpec("k-o-patterns", 4, 2, 4, ("k_proj", "o_proj", "up_proj"), rank_pattern={"o_proj": 6},
                alpha_pattern={"o_proj": 10, "up_proj": 3}),
)


def load_base(tiny_dir: Path):
    """A fresh transformers ``LlamaForCausalLM`` of the tiny model, float32, eval mode, EOS off."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def make_adapter(tiny_dir: Path, spec: AdapterSpec, out: Path) -> Path:
    """Write ``spec`` as a PEFT adapter directory at ``out`` (returned)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets), init_lora_weights=False,
                     use_rslora=spec.use_rslora, rank_pattern=dict(spec.rank_pattern),
                     alpha_pattern=dict(spec.alpha_pattern), lora_dropout=0.0)
    get_peft_model(load_base(tiny_dir), cfg).save_pretrained(out)
    return out


def merged_model(tiny_dir: Path, adapter_dir: Path | None):
    """PEFT's merged model of an adapter (``merge_and_unload``); the base model for None."""
    from peft import PeftModel

    base = load_base(tiny_dir)
    if adapter_dir is None:
        return base
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of ``model.generate`` after ``prompt``."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float32 log-probabilities of ``model`` at each position of ``ids``."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
