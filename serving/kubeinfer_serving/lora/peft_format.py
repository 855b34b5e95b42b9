"""Read a LoRA adapter saved by PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format is PEFT's (``PeftModel.save_pretrained``): tensors named
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]); the config's ``lora_alpha``, ``use_rslora``, ``alpha_pattern``
and ``target_modules``. Scaling follows ``peft.tuners.lora.layer.LoraLayer.update_layer``:
``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``; a module's alpha comes from the first
``alpha_pattern`` key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module_name)`` (PEFT's
``get_pattern_key``), else ``lora_alpha``; r is each module's tensor rank (so ``rank_pattern``
needs no reading).

Every way an adapter can be unusable is an :class:`~.adapter.AdapterLoadError` whose message
names the adapter and the reason: unreadable or corrupt files, features PEFT has that this
engine does not run (DoRA, LoRA biases, ``modules_to_save``, embedding or lm_head targets), a
rank above ``max_lora_rank``, shapes that do not fit the base model, target modules without
weights, non-finite values.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .adapter import TARGET_MODULES, AdapterLoadError, LoRAAdapter, LoRAShapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_TENSOR = re.compile(r"^(?:.*\.)?(?P<module>(?:model\.)?layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<target>\w+))"
                     r"\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
# Config values that mean a feature this engine does not implement: (key, accepted values).
_UNSUPPORTED = (("use_dora", (None, False)), ("lora_bias", (None, False)), ("bias", (None, "none")),
                ("modules_to_save", (None, [])), ("fan_in_fan_out", (None, False)),
                ("layer_replication", (None, [])), ("trainable_token_indices", (None, [], {})))


def _fail(name: str, reason: str) -> AdapterLoadError:
    return AdapterLoadError(f"adapter {name!r}: {reason}")


def read_adapter_config(path: Path, name: str) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory, checked for what we run.

    Raises:
        AdapterLoadError: missing or unparsable file, not a LoRA adapter, or an unsupported feature.
    """
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise _fail(name, f"no {CONFIG_FILE} in {path}")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(name, f"cannot parse {CONFIG_FILE}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise _fail(name, f"{CONFIG_FILE} is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(name, f"peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, accepted in _UNSUPPORTED:
        if cfg.get(key) not in accepted:
            raise _fail(name, f"{key}={cfg.get(key)!r} is not supported")
    if not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        raise _fail(name, f"lora_alpha {cfg.get('lora_alpha')!r} is not a number")
    return cfg


def _module_alpha(cfg: dict[str, Any], module: str) -> float:
    for key, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(alpha)
    return float(cfg.get("lora_alpha", 8))


def _declared_targets(cfg: dict[str, Any], name: str) -> set[str] | None:
    """The checkpoint modules ``target_modules`` lists (None: a regex or "all-linear", checked by tensors).

    Raises:
        AdapterLoadError: it lists modules our model does not have (e.g. ``lm_head``, ``c_attn``).
    """
    targets = cfg.get("target_modules")
    if targets is None or isinstance(targets, str):
        return None
    unknown = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(TARGET_MODULES))
    if unknown:
        raise _fail(name, f"targets modules the base model has no LoRA support for: {unknown} "
                          f"(supported: {sorted(TARGET_MODULES)})")
    return {t.rsplit(".", 1)[-1] for t in targets}


def load_peft_adapter(path: str | Path, name: str, shapes: LoRAShapes, max_rank: int, *,
                      source: str = "") -> LoRAAdapter:
    """Load and check a PEFT LoRA adapter directory against a base model.

    Args:
        path: the directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: the adapter's model id (for messages).
        shapes: the base model's targetable modules (:meth:`LoRAShapes.from_hf_config`).
        max_rank: the engine's ``max_lora_rank``.
        source: recorded on the adapter for display.

    Returns:
        the :class:`LoRAAdapter`, float32 weights with B pre-multiplied by its scaling.

    Raises:
        AdapterLoadError: see the module docstring.
    """
    path = Path(path)
    if not path.is_dir():
        raise _fail(name, f"adapter directory {path} does not exist")
    cfg = read_adapter_config(path, name)
    declared = _declared_targets(cfg, name)
    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        raise _fail(name, f"no {WEIGHTS_FILE} in {path}")
    digest = hashlib.sha256()
    try:
        with wfile.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        with safe_open(str(wfile), framework="pt", device="cpu") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _fail(name, f"corrupt {WEIGHTS_FILE}: {exc}") from exc
    digest.update(json.dumps(cfg, sort_keys=True).encode())

    parts: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        m = _TENSOR.match(key)
        if m is None or m["target"] not in TARGET_MODULES:
            raise _fail(name, f"tensor {key!r} is not a LoRA weight of a supported module "
                              f"(supported: {sorted(TARGET_MODULES)} in decoder layers)")
        layer = int(m["layer"])
        if layer >= shapes.num_layers:
            raise _fail(name, f"tensor {key!r} is for layer {layer}; the base model has {shapes.num_layers} layers")
        module = m["module"] if m["module"].startswith("model.") else f"model.{m['module']}"
        parts.setdefault((layer, m["target"]), {})[m["ab"]] = (module, tensor)
    if not parts:
        raise _fail(name, f"{WEIGHTS_FILE} holds no LoRA weights")

    use_rslora = bool(cfg.get("use_rslora", False))
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise _fail(name, f"layer {layer} {target} has lora_{''.join(ab)} but not both lora_A and lora_B")
        module, a = ab["A"]
        b = ab["B"][1]
        in_f, out_f = shapes.target_shape(target)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise _fail(name, f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and [out, r]")
        r = int(a.shape[0])
        if r > max_rank:
            raise _fail(name, f"rank {r} of {module} exceeds maxLoraRank {max_rank}")
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise _fail(name, f"{module}: shapes lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} do not fit the "
                              f"base model's {target} ({in_f} in, {out_f} out); made for another base model?")
        a, b = a.to(torch.float32), b.to(torch.float32)
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise _fail(name, f"{module} holds NaN or infinite values")
        alpha = _module_alpha(cfg, module)
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        weights[(layer, target)] = (a.contiguous(), (b * scaling).contiguous())
    present = {t for _, t in weights}
    if declared is not None and declared - present:
        raise _fail(name, f"target modules {sorted(declared - present)} are listed in {CONFIG_FILE} "
                          f"but have no weights in {WEIGHTS_FILE}")
    return LoRAAdapter(name=name, digest=digest.digest(), rank=max(a.shape[0] for a, _ in weights.values()),
                       weights=weights, source=source)
