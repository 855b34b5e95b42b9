"""Write a small Llama-architecture model in Hugging Face format, deterministic from a seed.

This is the project's built-in model (DESIGN.md section 6): it needs no hub and no network.
What it writes into ``out_dir``:

* ``config.json`` / ``model.safetensors``: a :class:`transformers.LlamaForCausalLM` whose
  weights are drawn from ``N(0, init_std**2)`` with a ``torch.Generator`` seeded by ``seed``
  (RMSNorm weights are 1). Saved as **float32** so CPU equality tests against Hugging Face
  ``generate`` are exact. ``init_std`` defaults to 0.08: at transformers' default 0.02 the
  output distribution is nearly flat and greedy picks become near-ties (notes/engine.md).
* ``tokenizer.json`` / ``tokenizer_config.json`` / ``chat_template.jinja``: a byte-level BPE
  tokenizer (GPT-2 style pre-tokenisation) trained offline with the ``tokenizers`` library on
  ``data/corpus.txt`` (shipped in the package) plus a procedurally generated supplement from a
  fixed seed, so its vocabulary reaches ``vocab_size``. The tokenizer does not depend on
  ``seed``: every tiny model shares it. Special tokens have fixed ids (see
  :data:`SPECIAL_TOKENS`); encoding prepends ``<|begin_of_text|>`` like Llama 3; the chat
  template is Llama-3 style.
* ``generation_config.json``: bos/pad ids and ``eos_token_id = [<|end_of_text|>, <|eot_id|>]``.

Building the same ``seed`` and shape twice gives byte-identical files.

CLI: ``python -m kubeinfer_serving.models.build_tiny --out DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import torch

#: Bump when the files written for a given seed change; part of the built-in cache path.
BUILDER_VERSION = 1

#: Special tokens in id order: they occupy ids 0..5 whatever the vocabulary size.
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, START_HEADER, END_HEADER, EOT_TOKEN = SPECIAL_TOKENS
BOS_ID, EOS_ID, PAD_ID, START_HEADER_ID, END_HEADER_ID, EOT_ID = range(len(SPECIAL_TOKENS))

#: Llama-3 style chat template (same layout as Meta's, without the tool-calling parts).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CORPUS_PATH = Path(__file__).with_name("data") / "corpus.txt"
_SUPPLEMENT_SEED = 20240601
_SUPPLEMENT_LINES = 6000


def _supplement(corpus: str) -> list[str]:
    """Procedural text that widens the corpus' vocabulary, from a fixed seed (not the model's).

    Mixes a word-bigram Markov walk over ``corpus`` (English-like statistics), invented
    names built from syllables (new words for BPE to merge), and numbers/dates/identifiers.

    Returns:
        ``_SUPPLEMENT_LINES`` lines of text, identical on every run and Python >= 3.2.
    """
    rng = random.Random(_SUPPLEMENT_SEED)
    words = corpus.split()
    following: dict[str, list[str]] = {}
    for a, b in zip(words, words[1:], strict=False):
        following.setdefault(a, []).append(b)
    starts = sorted(following)
    onsets = ["b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p",
              "pr", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ie", "ou", "y"]
    codas = ["", "", "n", "r", "l", "s", "th", "nd", "rt", "m", "x"]

    def name() -> str:
        n = rng.randint(2, 4)
        return "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n)).capitalize()

    def walk(length: int) -> str:
        word = rng.choice(starts)
        out = [word]
        for _ in range(length - 1):
            nxt = following.get(word)
            word = rng.choice(nxt) if nxt else rng.choice(starts)
            out.append(word)
        return " ".join(out)

    lines = []
    for i in range(_SUPPLEMENT_LINES):
        kind = i % 4
        if kind == 0:
            lines.append(walk(rng.randint(8, 30)))
        elif kind == 1:
            lines.append(f"{name()} travelled from {name()} to {name()} in {rng.randint(1200, 2030)}, "
                         f"carrying {rng.randint(2, 999)} {rng.choice(words).strip('.,;:!?')}.")
        elif kind == 2:
            ident = "_".join(name().lower() for _ in range(rng.randint(1, 3)))
            lines.append(f"{ident} = {rng.randint(0, 10**rng.randint(1, 7))}  # {walk(rng.randint(3, 8))}")
        else:
            lines.append(f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1900, 2030)} "
                         f"{name()} {name()}: {rng.uniform(0, 1000):.2f} ({rng.randint(0, 100)}%)")
    return lines


def build_tokenizer(vocab_size: int = 8192, model_max_length: int = 2048):
    """Train the byte-level BPE tokenizer and wrap it for transformers.

    Args:
        vocab_size: exact vocabulary size in tokens, special tokens included.
        model_max_length: recorded in tokenizer_config.json (tokens).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad set and the chat template.

    Raises:
        ValueError: the corpus cannot support ``vocab_size`` distinct tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    texts = corpus.split("\n\n") + _supplement(corpus)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the tokenizer corpus yields {tok.get_vocab_size()} tokens, not the requested {vocab_size}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _init_weights(model: torch.nn.Module, seed: int, init_std: float) -> None:
    """Overwrite every parameter deterministically: norms -> 1, others ~ N(0, init_std^2), in name order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * init_std)


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    *,
    vocab_size: int = 8192,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 704,
    max_position_embeddings: int = 2048,
    init_std: float = 0.08,
) -> Path:
    """Write the tiny Llama model, tokenizer and generation config into ``out_dir``.

    Args:
        out_dir: target directory (created; existing files with the same names are overwritten).
        seed: seeds the weights only; the tokenizer is the same for every seed.
        vocab_size: tokens, special tokens included (tokenizer and embedding rows agree exactly).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: Llama shape
            (head_dim = hidden_size // num_heads; grouped-query attention when num_kv_heads < num_heads).
        max_position_embeddings: context length in tokens (RoPE theta 500000 as in Llama 3).
        init_std: standard deviation of the random weights.

    Returns:
        ``out_dir`` as a resolved Path. Weights are float32 (``model.safetensors``,
        about 7.1M parameters = 28 MiB at the default shape).

    Raises:
        ValueError: invalid shape, or a vocabulary larger than the tokenizer corpus supports.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(vocab_size, max_position_embeddings)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, EOT_ID],
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    _init_weights(model, seed, init_std)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, EOT_ID], pad_token_id=PAD_ID
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the output directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--force", action="store_true", help="delete OUT first if it exists")
    args = parser.parse_args(argv)
    if args.force and Path(args.out).exists():
        shutil.rmtree(args.out)
    print(build_tiny_model(args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
