"""GGUF files as a model format: metadata, tokenizer and dequantized weights.

A ``.gguf`` file (llama.cpp's format, spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md)
holds the config, the tokenizer and the (usually block-quantized) weights of one model. This
module reads it with transformers' GGUF support, which dequantizes with the ``gguf`` package
(``gguf.dequantize``, numpy) and maps llama.cpp's tensor names back to Hugging Face's
(undoing the Q/K row permutation of llama.cpp's converter):

* :func:`read_gguf`: the header only (memory-mapped, no tensor is dequantized): architecture,
  config, tensor types and element counts; refuses an architecture the engine does not
  implement or a tensor type that cannot be dequantized, naming it;
* :func:`gguf_tokenizer`: the tokenizer rebuilt from the metadata, with two fixes to
  transformers' conversion (verified on SmolLM2-135M-Instruct with transformers 5.17):

  - its Llama converter takes the EOS *and* BOS token from ``tokenizer.ggml.bos_token_id``
    (``<|im_start|>`` for SmolLM2, whose EOS is ``<|im_end|>``, id 2): both are set again from
    the metadata's ids;
  - it gives every byte-level BPE tokenizer of a ``llama`` GGUF the plain GPT-2 pre-tokenizer,
    losing the one ``tokenizer.ggml.pre`` names (SmolLM2's ``smollm`` splits digits one by one;
    Llama 3's ``llama-bpe`` has its own split regex): :data:`PRE_TOKENIZERS` restores them, as
    llama.cpp's ``llama-vocab.cpp`` defines them, and an unknown one fails the model;
* :func:`iter_gguf_weights`: ``(hf_name, tensor)`` pairs, one tensor dequantized at a time, in
  the requested dtype;
* :func:`convert_gguf`: a plain Hugging Face directory (config.json, model.safetensors,
  tokenizer files) with deterministic bytes.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kubeinfer_serving.models.loader import ModelLoadError, UnsupportedModelError

GGUF_SUFFIX = ".gguf"
#: Special tokens set from the GGUF metadata: tokenizer attribute prefix -> metadata key.
_SPECIAL_TOKEN_FIELDS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                         "pad": "tokenizer.ggml.padding_token_id"}
#: GGUF ``general.architecture`` -> the Hugging Face architecture the engine runs it as.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: Tensor types dequantized (``gguf.dequantize``): float, legacy block and k-quant formats.
GGUF_TENSOR_TYPES = frozenset({
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
})
#: Split regex of Llama 3's pre-tokenizer (llama.cpp ``LLAMA_VOCAB_PRE_TYPE_LLAMA3``).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_smollm() -> Any:
    from tokenizers import pre_tokenizers as pt

    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def _pre_llama3() -> Any:
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


def _pre_gpt2() -> Any:
    from tokenizers import pre_tokenizers as pt

    return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


#: ``tokenizer.ggml.pre`` of a byte-level BPE (``gpt2``) tokenizer -> its pre-tokenizer. ``qwen2``
#: keeps the one transformers' Qwen2 converter builds (Qwen2's regex).
PRE_TOKENIZERS = {"smollm": _pre_smollm, "llama-bpe": _pre_llama3, "llama3": _pre_llama3,
                  "default": _pre_gpt2, "gpt-2": _pre_gpt2, "qwen2": None}


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` names a GGUF file (by its ``.gguf`` suffix; the file need not exist)."""
    return str(path).lower().endswith(GGUF_SUFFIX)


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says, read without dequantizing any tensor.

    Attributes:
        path: the file.
        architecture: ``general.architecture`` (``llama``, ``mistral``, ``qwen2``).
        hf_config: the Hugging Face config (``architectures`` set, EOS/BOS ids from the metadata).
        numel: elements of all weight tensors (times a dtype's size: the bytes once dequantized).
        file_bytes: the file's size in bytes.
        tensor_types: tensor type name -> how many tensors have it.
        metadata: the scalar and string metadata (``general.*``, ``tokenizer.ggml.*`` without
            the vocabulary arrays).
        reader: the ``gguf.GGUFReader`` of the file (memory-mapped), reused to read the tensors.
    """

    path: Path
    architecture: str
    hf_config: Any
    numel: int
    file_bytes: int
    tensor_types: dict[str, int]
    metadata: dict[str, Any]
    reader: Any = field(default=None, repr=False, compare=False)


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelLoadError(f"loading {path} needs the gguf package (pip install gguf)") from exc
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist or is not a file")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/KeyError/struct errors on a corrupt file
        raise ModelLoadError(f"corrupt GGUF file {path}: {exc}") from exc


def _scalar_metadata(reader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, entry in reader.fields.items():
        if len(entry.data) != 1 or key.startswith("GGUF."):
            continue
        try:
            out[key] = entry.contents()
        except Exception:  # noqa: BLE001 - a field the reader cannot decode is left out
            continue
    return out


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read a GGUF header and check that the engine can serve the model.

    Reading the metadata of a file takes seconds (the vocabulary is parsed in Python); the
    result is remembered per path, size and modification time.

    Raises:
        ModelLoadError: the file is missing or corrupt, the gguf package is missing, or a tensor
            has a type that cannot be dequantized (the message names the type and a tensor).
        UnsupportedModelError: ``general.architecture`` is not llama, mistral or qwen2.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ModelLoadError(f"GGUF file {p} does not exist or is not a file") from exc
    return _read_gguf(p, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_gguf(p: Path, size: int, mtime_ns: int) -> GGUFInfo:
    reader = _reader(p)
    meta = _scalar_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF file {p} has architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    types: Counter[str] = Counter()
    numel = 0
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in GGUF_TENSOR_TYPES:
            raise ModelLoadError(f"GGUF file {p}: tensor {t.tensor_type.name} type of {t.name!r} cannot be "
                                 f"dequantized; supported: {', '.join(sorted(GGUF_TENSOR_TYPES))}")
        types[name] += 1
        numel += int(t.n_elements)
    return GGUFInfo(p, arch, _config(p, arch, meta), numel, p.stat().st_size, dict(types), meta, reader)


def _config(path: Path, arch: str, meta: dict[str, Any]):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the config of GGUF file {path}: {exc}") from exc
    config.architectures = [GGUF_ARCHITECTURES.get(config.model_type, GGUF_ARCHITECTURES[arch])]
    for key, name in _SPECIAL_TOKEN_FIELDS.items():
        if meta.get(name) is not None:
            setattr(config, f"{key}_token_id", int(meta[name]))
    return config


def gguf_tokenizer(path: str | Path, info: GGUFInfo | None = None):
    """The tokenizer of a GGUF file, with the chat template of its metadata and the fixes above.

    Raises:
        ModelLoadError: the tokenizer cannot be converted, or its ``tokenizer.ggml.pre`` is not in
            :data:`PRE_TOKENIZERS` (the message names it).
    """
    from tokenizers import decoders
    from transformers import AutoTokenizer

    p = Path(path)
    info = info or read_gguf(p)
    meta = info.metadata
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot convert the tokenizer of GGUF file {p}: {exc}") from exc
    if meta.get("tokenizer.ggml.model") == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ModelLoadError(f"GGUF file {p}: pre-tokenizer {pre!r} is not supported; "
                                 f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
        if PRE_TOKENIZERS[pre] is not None:
            tok.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
        # Byte-level BPE: the byte-level decoder alone, no clean-up of spaces (llama.cpp's detokenizer).
        tok.backend_tokenizer.decoder = decoders.ByteLevel()
        tok.clean_up_tokenization_spaces = False
    for key, name in _SPECIAL_TOKEN_FIELDS.items():
        if meta.get(name) is not None:
            setattr(tok, f"{key}_token", tok.convert_ids_to_tokens(int(meta[name])))
    template = meta.get("tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


def iter_gguf_weights(path: str | Path, *, dtype: torch.dtype = torch.float32,
                      info: GGUFInfo | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight, dequantized one tensor at a time into ``dtype``.

    Names and the Q/K permutation follow transformers' GGUF mapping
    (``transformers.modeling_gguf_pytorch_utils``); tensors that map to no Hugging Face
    parameter (e.g. llama.cpp's ``rope_freqs``) are skipped.

    Raises:
        ModelLoadError: as :func:`read_gguf`, or a tensor that fails to dequantize.
    """
    import numpy as np
    from gguf import dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    p = Path(path)
    info = info or read_gguf(p)
    reader = info.reader if info.reader is not None else _reader(p)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(info.hf_config)
    processor = TENSOR_PROCESSORS.get(info.architecture, TensorProcessor)(config=info.hf_config.to_dict())
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    del skeleton
    for t in reader.tensors:
        try:
            weights = dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"GGUF file {p}: cannot dequantize {t.name!r} ({t.tensor_type.name}): {exc}") from exc
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=mapping, parsed_parameters={})
        if result.name not in mapping:
            continue
        yield mapping[result.name], torch.from_numpy(np.array(result.weights, copy=True)).to(dtype)  # off the mmap


def convert_gguf(path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a GGUF model as a plain Hugging Face directory with deterministic bytes.

    Files: ``config.json`` (sorted keys, no transformers version), ``model.safetensors``
    (tensors in name order, tied ``lm_head`` left out), and the tokenizer's files from
    ``save_pretrained`` (``tokenizer.json``, ``tokenizer_config.json``, the chat template).
    The same file and dtype give byte-identical files.

    Raises:
        ModelLoadError: as :func:`read_gguf` / :func:`gguf_tokenizer` / :func:`iter_gguf_weights`.
        OSError: ``out_dir`` cannot be written.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = read_gguf(path)
    tied = bool(getattr(info.hf_config, "tie_word_embeddings", False))
    tensors = {name: t.contiguous() for name, t in iter_gguf_weights(path, dtype=dtype, info=info)
               if not (tied and name == "lm_head.weight")}
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config = info.hf_config.to_dict()
    for key in ("transformers_version", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)  # the scratch path of the file, the tool's version: not the model's
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gguf_tokenizer(path, info).save_pretrained(str(out))
    return out
