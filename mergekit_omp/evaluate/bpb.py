"""Bits per byte of a causal LM on a text, each model with its own tokenizer.

    bpb = (sum over scored tokens of -ln p(token | context)) / ln 2 / (UTF-8 bytes of the text)

Unlike perplexity, bits per byte compares models whose tokenizers differ, which is what a
tokenizer transplant changes. The text is tokenized once without special tokens and cut
into non-overlapping windows. What comes in front of each window (``bos``):

* ``"auto"``: the tokenizer's BOS token if the tokenizer adds one by itself, else nothing;
* ``"none"``: no BOS; a window after the first is preceded by the last token of the one
  before, so that only the text's very first token goes unscored;
* a token id or token string: that token in front of every window, so every token is scored.

``bos_embedding`` (a (1, hidden) row, as the embedding module outputs it) is put in front
of every window instead of a token, through ``inputs_embeds``: a model transplanted onto a
tokenizer without the original ``<bos>`` can still be given the original ``<bos>`` row.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import tqdm
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergekit_omp.errors import TransplantError
from mergekit_omp.lm import effective_window, tokenizer_adds_bos


class BitsPerByte(BaseModel):
    """One model's bits per byte on one text, and what went into it."""

    bpb: float
    nll_nats: float
    bytes: int
    tokens: int
    scored_tokens: int
    window: int
    bos_id: int | None
    seconds: float = 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


def read_text(path: str | Path, max_bytes: int | None = None) -> str:
    """The file's text, cut to ``max_bytes`` without splitting a character."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TransplantError(f"cannot read text file {path}: {exc.strerror or exc}") from None
    if max_bytes is not None:
        data = data[:max_bytes]
    text = data.decode("utf-8", errors="ignore")
    if not text:
        raise TransplantError(f"text file {path} is empty")
    return text


def resolve_bos(tokenizer: PreTrainedTokenizerBase, bos: str | int) -> int | None:
    """The token id put in front of every window, or None (see the module docstring)."""
    if isinstance(bos, int):
        return bos
    if bos == "auto":
        return tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    if bos == "none":
        return None
    if bos.lstrip("-").isdigit():
        if not 0 <= int(bos) < len(tokenizer):
            raise TransplantError(
                f"--bos {bos}: the tokenizer has no token {bos} (its ids are 0 to "
                f"{len(tokenizer) - 1})"
            )
        return int(bos)
    token_id = tokenizer.convert_tokens_to_ids(bos)
    if not isinstance(token_id, int) or (
        token_id == tokenizer.unk_token_id and bos != tokenizer.unk_token
    ):
        raise TransplantError(f"BOS token {bos!r} is not in the tokenizer's vocabulary")
    return token_id


@torch.no_grad()
def bits_per_byte(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    window: int | None = None,
    bos: str | int = "auto",
    bos_embedding: torch.Tensor | None = None,
    progress: bool = False,
    description: str = "bits per byte",
) -> BitsPerByte:
    """``model``'s bits per byte on ``text`` tokenized by ``tokenizer`` (see the module doc);
    ``bos_embedding`` takes precedence over ``bos``."""
    start_time = time.perf_counter()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos_id = None if bos_embedding is not None else resolve_bos(tokenizer, bos)
    size = effective_window(model, window)
    device = next(model.parameters()).device
    nll, scored = 0.0, 0
    starts = range(0, len(ids), size)
    for start in tqdm.tqdm(starts, desc=description, disable=not progress, leave=False):
        chunk = ids[start : start + size]
        if bos_embedding is not None:
            targets = torch.tensor(chunk, device=device)
            embedded = model.get_input_embeddings()(targets)
            inputs_embeds = torch.cat([bos_embedding.to(embedded), embedded])[None]
            logits = model(inputs_embeds=inputs_embeds).logits[0, :-1]
        else:
            if bos_id is not None:
                prefix = [bos_id]
            elif start > 0:
                prefix = [ids[start - 1]]
            else:
                prefix = []
            inputs = torch.tensor([prefix + chunk], device=device)
            if inputs.shape[1] < 2:
                continue
            logits = model(input_ids=inputs).logits[0, :-1]
            targets = inputs[0, 1:]
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        scored += targets.numel()
    n_bytes = len(text.encode("utf-8"))
    return BitsPerByte(
        bpb=nll / math.log(2) / n_bytes,
        nll_nats=nll,
        bytes=n_bytes,
        tokens=len(ids),
        scored_tokens=scored,
        window=size,
        bos_id=bos_id,
        seconds=round(time.perf_counter() - start_time, 3),
    )
