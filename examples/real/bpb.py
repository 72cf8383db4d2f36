#!/usr/bin/env python
"""Bits per byte of a causal LM on a text file, with the model's own tokenizer (CPU).

    bpb = sum over tokens of -ln p(token | context) / ln 2 / (UTF-8 bytes of the text)

Bits per byte, unlike perplexity, compares models with different tokenizers, which is
what a tokenizer transplant changes. A command-line front of ``mergekit_omp.evaluate.bpb``
(the function ``mergekit-omp-eval`` and ``benchmarks/real_pair.py`` use) that adds
``--bos-embedding``; used for the measurements in docs/results.md.

The text is tokenized once, without special tokens, and cut into non-overlapping windows
of ``--window`` tokens. What comes in front of each window is set by ``--bos``:

* ``auto`` (default): the tokenizer's BOS token if its tokenizer adds one by itself
  (Gemma does), otherwise nothing (SmolLM2's adds none);
* ``none``: no BOS; each window after the first is preceded by the last token of the
  previous window, so that only the very first token of the text goes unscored;
* an integer token id or a token string (e.g. ``'<|endoftext|>'``): that token in front
  of every window, so that every token of the text is scored.

``--bos-embedding DIR:ID`` instead puts row ID of another model's input embedding in
front of every window (fed as ``inputs_embeds``): a model transplanted onto a tokenizer
without the original ``<bos>`` can still be given the original ``<bos>`` row.

With a BOS every window starts afresh (a BOS mid-context would be odd); without one the
windows are only joined by one token of context. Either way the result is comparable for
one model and one window size; the unscored first token (``--bos none``) is reported.

    python examples/real/bpb.py MODEL_DIR TEXT [--max-bytes 50000] [--window 1024]
        [--bos auto|none|ID|TOKEN] [--bos-embedding DIR:ID] [--tokenizer DIR] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_omp.evaluate.bpb import bits_per_byte, read_text


def embedding_row(model_dir: str, token_id: int) -> torch.Tensor:
    """One row of a model's input embedding as its embedding module returns it (Gemma's
    module includes the sqrt(hidden) scale), so it can stand in front of another model's
    inputs_embeds. Used to give a transplanted Gemma its original ``<bos>`` row."""
    other = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        row = other.get_input_embeddings()(torch.tensor([token_id])).clone()
    del other
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="HF model directory")
    ap.add_argument("text", help="UTF-8 text file")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    ap.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes")
    ap.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    ap.add_argument("--bos", default="auto", help="auto | none | token id | token string")
    ap.add_argument(
        "--bos-embedding",
        metavar="DIR:ID",
        help="put row ID of model DIR's input embedding first in every window instead of a "
        "token (e.g. the original Gemma's <bos>, id 2, in front of a transplanted Gemma)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json-out", help="also write the result as JSON here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    text = read_text(args.text, args.max_bytes)
    bos_embedding = None
    if args.bos_embedding:
        src, _, row = args.bos_embedding.rpartition(":")
        bos_embedding = embedding_row(src, int(row))
    result = bits_per_byte(
        model,
        tok,
        text,
        window=args.window,
        bos=args.bos,
        bos_embedding=bos_embedding,
        progress=True,
    )
    res = {
        "model": str(args.model),
        "text": str(args.text),
        "max_bytes": args.max_bytes,
        "bos_arg": args.bos,
        "bos_embedding": args.bos_embedding,
        **result.model_dump(),
        "bytes_per_token": result.bytes_per_token,
        "unscored_tokens": result.tokens - result.scored_tokens,
        "bos_token": None if result.bos_id is None else tok.convert_ids_to_tokens(result.bos_id),
    }
    print(json.dumps(res, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
