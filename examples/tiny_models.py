"""Tiny tokenizers and Llama models built on the fly (nothing is downloaded).

Used by the examples (``make_tiny_pair.py``) and, through ``tests/tiny.py``, by the tests:
the examples run on a fresh clone without the tests, so the builders live here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Tokenizers split text into pieces; models learn one row per piece.\n",
    "\tIndented line with a tab, then numbers: 12 345 6789 and 3.14159.\n",
    "Café, naïve, façade, jalapeño — déjà vu.\n",
    "日本語のテキストと中文文本 mixed with English words.\n",
    "def transplant(base, donor):\n    return base.with_tokenizer(donor)\n",
    "Emoji 🙂 and symbols © ® ™ € £ ¥ appear now and then.\n",
    "Speculative decoding needs the draft and target to share a vocabulary.\n",
    "Orthogonal matching pursuit selects anchors greedily and refits coefficients.\n",
]
BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
METASPACE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def corpus(repeat: int = 20) -> list[str]:
    return CORPUS * repeat


def byte_level_tokenizer(
    vocab_size: int = 400,
    specials: list[str] | None = None,
    texts: list[str] | None = None,
    individual_digits: bool = False,
) -> transformers.PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer (``Ġ`` for space, ``Ċ`` for newline)."""
    specials = BYTE_LEVEL_SPECIALS if specials is None else specials
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if individual_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or corpus(), trainer)
    first = specials[0] if specials else None
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=first, eos_token=first, unk_token=None
    )


def metaspace_tokenizer(
    vocab_size: int = 400, texts: list[str] | None = None
) -> transformers.PreTrainedTokenizerFast:
    """A sentencepiece-style BPE tokenizer: ``▁`` for space, ``<0xNN>`` byte fallback."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=METASPACE_SPECIALS, show_progress=False
    )
    trainer_tok.train_from_iterator(texts or corpus(), trainer)
    learned = sorted(trainer_tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for token in METASPACE_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]:
        vocab[token] = len(vocab)
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    merges = _merges_of(trainer_tok)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(METASPACE_SPECIALS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def _merges_of(tok: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def tiny_llama_model(
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    hidden_size: int = 32,
    tied: bool = False,
    extra_rows: int = 0,
    seed: int = 0,
    embed: torch.Tensor | None = None,
    lm_head: torch.Tensor | None = None,
) -> transformers.LlamaForCausalLM:
    """A 1-layer Llama with ``tokenizer``'s vocabulary (plus ``extra_rows``), randomly
    initialised from ``seed`` unless ``embed``/``lm_head`` are given."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) + extra_rows,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        if embed is not None:
            model.model.embed_tokens.weight.copy_(embed)
        if lm_head is not None and not tied:
            model.lm_head.weight.copy_(lm_head)
    return model


def save(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    out_dir: Path,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_llama(tokenizer: transformers.PreTrainedTokenizerBase, out_dir: Path, **options) -> Path:
    """Save ``tiny_llama_model(tokenizer, **options)`` with ``tokenizer`` to ``out_dir``."""
    return save(tiny_llama_model(tokenizer, **options), tokenizer, out_dir)
