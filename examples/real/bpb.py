#!/usr/bin/env python
"""Bits per byte of a causal LM on a text file, with the model's own tokenizer (CPU).

    bpb = sum over tokens of -ln p(token | context) / ln 2 / (UTF-8 bytes of the text)

Bits per byte, unlike perplexity, compares models with different tokenizers, which is
what a tokenizer transplant changes. Self-contained on purpose (a library version will
live in the package); used for the measurements in docs/results.md.

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
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def read_text(path: str | Path, max_bytes: int | None = None) -> str:
    data = Path(path).read_bytes()
    if max_bytes is not None and len(data) > max_bytes:
        data = data[:max_bytes]
    # A cut may split a multi-byte character; drop the partial tail.
    return data.decode("utf-8", errors="ignore")


def tokenizer_adds_bos(tok) -> bool:
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return len(ids) > 0 and ids[0] == tok.bos_token_id


def resolve_bos(tok, bos: str) -> int | None:
    """The token id put in front of every window, or None."""
    if bos == "auto":
        return tok.bos_token_id if tokenizer_adds_bos(tok) else None
    if bos == "none":
        return None
    if bos.lstrip("-").isdigit():
        return int(bos)
    tid = tok.convert_tokens_to_ids(bos)
    if tid is None or (tid == tok.unk_token_id and bos != tok.unk_token):
        raise ValueError(f"token {bos!r} is not in the vocabulary")
    return tid


def embedding_row(model_dir: str, token_id: int) -> torch.Tensor:
    """One row of a model's input embedding as its embedding module returns it (Gemma's
    module includes the sqrt(hidden) scale), so it can stand in front of another model's
    inputs_embeds. Used to give a transplanted Gemma its original ``<bos>`` row."""
    other = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        row = other.get_input_embeddings()(torch.tensor([token_id])).clone()
    del other
    return row


@torch.no_grad()
def bits_per_byte(
    model,
    tok,
    text: str,
    window: int = 1024,
    bos_id: int | None = None,
    bos_embedding: torch.Tensor | None = None,
    progress: bool = True,
) -> dict:
    """``bos_embedding`` (shape [1, hidden]), if given, is the input at the first position
    of every window instead of a token (takes precedence over ``bos_id``)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_bytes = len(text.encode("utf-8"))
    nll, scored = 0.0, 0
    t0 = time.time()
    embed = model.get_input_embeddings()
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if bos_embedding is not None:
            x = torch.cat([bos_embedding, embed(torch.tensor(chunk))])[None]
            logits = model(inputs_embeds=x).logits[0, :-1].float()
            targets = torch.tensor(chunk)
        else:
            if bos_id is not None:
                prefix = [bos_id]
            elif start > 0:
                prefix = [ids[start - 1]]
            else:
                prefix = []
            inp = torch.tensor([prefix + chunk])
            logits = model(input_ids=inp).logits[0, :-1].float()
            targets = inp[0, 1:]
        losses = F.cross_entropy(logits, targets, reduction="none")
        nll += losses.sum().item()
        scored += targets.numel()
        if progress:
            print(
                f"  window {start // window + 1}/{math.ceil(len(ids) / window)}: "
                f"{nll / math.log(2) / n_bytes:.4f} bpb so far ({time.time() - t0:.0f} s)",
                flush=True,
            )
    return {
        "bytes": n_bytes,
        "tokens": len(ids),
        "scored_tokens": scored,
        "unscored_tokens": len(ids) - scored,
        "bytes_per_token": n_bytes / max(len(ids), 1),
        "nll_nats": nll,
        "bpb": nll / math.log(2) / n_bytes,
        "window": window,
        "bos_id": None if bos_embedding is not None else bos_id,
        "bos_token": (
            tok.convert_ids_to_tokens(bos_id)
            if bos_id is not None and bos_embedding is None
            else None
        ),
        "seconds": time.time() - t0,
    }


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
    bos_id = resolve_bos(tok, args.bos)
    bos_embedding = None
    if args.bos_embedding:
        src, _, row = args.bos_embedding.rpartition(":")
        bos_embedding = embedding_row(src, int(row))
    res = bits_per_byte(
        model, tok, text, window=args.window, bos_id=bos_id, bos_embedding=bos_embedding
    )
    res = {
        "model": str(args.model),
        "text": str(args.text),
        "max_bytes": args.max_bytes,
        "bos_arg": args.bos,
        "bos_embedding": args.bos_embedding,
        **res,
    }
    print(json.dumps(res, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
