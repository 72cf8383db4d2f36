"""Build the tiny models the examples use, in seconds, with nothing downloaded.

    python examples/make_tiny_pair.py examples/tiny

writes three 1-layer Llama models under OUTDIR:

* ``base``: a sentencepiece-style tokenizer (``▁`` for space, ``<0xNN>`` byte fallback),
  untied embeddings, hidden size 48. The model whose weights a transplant keeps.
* ``donor``: a byte-level BPE tokenizer (``Ġ`` for space), tied embeddings, hidden size 32.
  The model whose tokenizer a transplant gives the base.
* ``donor-chat``: the donor "fine-tuned" (its weights plus small noise) with four tokens
  added to its vocabulary (``<think>``, ``</think>``, ``<tool_call>``, ``</tool_call>``),
  for the merge examples: a union-tokenizer merge of ``donor`` and ``donor-chat`` has
  tokens the donor lacks.

The models are random: they show the commands work, not what a transplant is worth.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import transformers
from tiny_models import (
    byte_level_tokenizer,
    metaspace_tokenizer,
    save,
    tiny_llama_model,
)

CHAT_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
FINE_TUNE_NOISE = 0.02


def fine_tuned_with_new_tokens(
    model: transformers.PreTrainedModel, donor_dir: Path, seed: int
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """``model`` plus small noise on every weight, with CHAT_TOKENS added to the vocabulary."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(donor_dir)
    tokenizer.add_tokens(CHAT_TOKENS, special_tokens=True)
    chat = copy.deepcopy(model)
    torch.manual_seed(seed)
    chat.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for parameter in chat.parameters():
            parameter.add_(FINE_TUNE_NOISE * torch.randn_like(parameter))
    return chat, tokenizer


def make_tiny_models(out_dir: Path) -> dict[str, Path]:
    """Write ``base``, ``donor`` and ``donor-chat`` under ``out_dir``; return their paths."""
    base_tok = metaspace_tokenizer(400)
    donor_tok = byte_level_tokenizer(400)
    base = save(tiny_llama_model(base_tok, hidden_size=48, seed=1), base_tok, out_dir / "base")
    donor_model = tiny_llama_model(donor_tok, hidden_size=32, tied=True, seed=2)
    donor = save(donor_model, donor_tok, out_dir / "donor")
    chat_model, chat_tok = fine_tuned_with_new_tokens(donor_model, donor, seed=3)
    chat = save(chat_model, chat_tok, out_dir / "donor-chat")
    return {"base": base, "donor": donor, "donor-chat": chat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out_dir", type=Path, help="directory to write base/, donor/, donor-chat/ to"
    )
    args = parser.parse_args()
    for name, path in make_tiny_models(args.out_dir).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
