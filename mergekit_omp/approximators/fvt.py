"""Fast Vocabulary Transfer (Gee, Zugarini, Rigutini and Torroni, EMNLP 2022 industry
track, https://aclanthology.org/2022.emnlp-industry.41); alias ``subword``.

FVT initialises a new token by splitting its text with the old tokenizer and averaging the
old embeddings of the pieces. mergekit-tokensurgeon's ``subword`` method is the same idea
with a choice of pooling (``subword_method``: mean, sum, weighted_mean, first_last), which
this method accepts too.

Adapted to this setting (same language, a donor model): the new token's text is the bytes
it stands for in the donor vocabulary, split with the base tokenizer into base tokens
whose bytes concatenate to exactly those bytes. The base tokenizer's own split is used
when it does that; a sentencepiece-style tokenizer adds a word-start "▁" to any text it
encodes, so a donor token without a leading space is instead split by the base
tokenizer's model alone (no normaliser, no pre-tokeniser) on the token as the base
vocabulary spells it, and failing that greedily into the longest base tokens. Bytes that
are not valid UTF-8 on their own (a piece of a multi-byte character) are split greedily
into base tokens with those bytes (byte-level alphabet or ``<0xNN>`` byte fallback).
Pieces are restricted to tokens of ``problem.base_vocab`` with a base row. A token with
no pieces gets the mean of the base rows.

Pooling differs from mergekit 0.1.5 in one case: ``weighted_mean`` weights the last piece
most for input embeddings and the first most for the LM head, as mergekit's comment and its
``first_last`` method intend (its code does the reverse).
"""

from functools import cached_property
from typing import Literal

import torch

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator
from mergekit_omp.approximators.similarity import target_batches
from mergekit_omp.match import first_id_by_bytes

SubwordMethod = Literal["mean", "sum", "weighted_mean", "first_last"]


def utf8_segments(data: bytes) -> list[str | bytes]:
    """``data`` as runs of valid UTF-8 text (str) and of stray bytes (bytes), in order."""
    segments: list[str | bytes] = []
    while data:
        try:
            segments.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as exc:
            if exc.start:
                segments.append(data[: exc.start].decode("utf-8"))
            stray = data[exc.start : exc.end]
            if segments and isinstance(segments[-1], bytes):
                segments[-1] += stray
            else:
                segments.append(stray)
            data = data[exc.end :]
    return segments


class BasePieces:
    """Splits bytes into base tokens whose bytes concatenate to exactly those bytes."""

    def __init__(self, problem: ApproximationProblem) -> None:
        self.problem = problem
        self.vocab = problem.base_vocab
        self.tokenizer = problem.base_tokenizer
        rows = problem.base_matrix.shape[0]
        self.allowed = {token_id for token_id in self.vocab.forms if token_id < rows}

    @cached_property
    def by_bytes(self) -> dict[bytes, int]:
        """Bytes -> lowest allowed id over ordinary and byte-fallback tokens."""
        return first_id_by_bytes(self.vocab, self.allowed)

    @cached_property
    def longest_piece(self) -> int:
        return max((len(data) for data in self.by_bytes), default=1)

    def spells(self, ids: list[int], data: bytes) -> bool:
        return all(i in self.allowed for i in ids) and (
            b"".join(self.vocab.forms[i].data for i in ids) == data
        )

    def greedy(self, data: bytes) -> list[int] | None:
        """Longest allowed base token at each position; None if some byte has none."""
        ids, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + self.longest_piece), start, -1):
                if (token_id := self.by_bytes.get(data[start:end])) is not None:
                    ids.append(token_id)
                    start = end
                    break
            else:
                return None
        return ids

    def model_split(self, text: str) -> list[int] | None:
        """The tokenizer model alone on the vocabulary spelling: no normaliser, no prefix."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        return [token.id for token in backend.model.tokenize(self.vocab.spelling(text))]

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.tokenizer is None or not texts:
            return [[] for _ in texts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def text_pieces(self, text: str, encoded: list[int]) -> list[int]:
        data = text.encode("utf-8")
        if self.spells(encoded, data):
            return encoded
        model_ids = self.model_split(text)
        if model_ids is not None and self.spells(model_ids, data):
            return model_ids
        greedy = self.greedy(data)
        if greedy is not None:
            return greedy
        return [i for i in encoded if i in self.allowed]

    def pieces(self, data: bytes, encoded: dict[str, list[int]]) -> list[int]:
        """Base token ids for the donor token with bytes ``data``."""
        ids: list[int] = []
        for segment in utf8_segments(data):
            if isinstance(segment, str):
                ids.extend(self.text_pieces(segment, encoded[segment]))
            else:
                ids.extend(self.greedy(segment) or [])
        return ids

    def batch(self, token_ids: list[int]) -> list[list[int]]:
        """Pieces for each donor token id, encoding their texts in one tokenizer call."""
        datas = [self.problem.donor_vocab.forms[token_id].data for token_id in token_ids]
        texts = sorted({s for d in datas for s in utf8_segments(d) if isinstance(s, str)})
        encoded = dict(zip(texts, self.encode(texts), strict=True))
        return [self.pieces(data, encoded) for data in datas]


def pooling_weights(count: int, method: SubwordMethod, is_lm_head: bool) -> torch.Tensor:
    """How much each of ``count`` pieces counts, first piece first."""
    if method == "mean":
        return torch.full((count,), 1.0 / count)
    if method == "sum":
        return torch.ones(count)
    if method == "weighted_mean":
        ramp = torch.arange(1, count + 1, dtype=torch.float32)
        ramp = ramp.flip(0) if is_lm_head else ramp
        return ramp / ramp.sum()
    one_hot = torch.zeros(count)
    one_hot[0 if is_lm_head else -1] = 1.0
    return one_hot


@approximator(
    "fvt",
    pretty_name="Fast Vocabulary Transfer",
    reference_url="https://aclanthology.org/2022.emnlp-industry.41",
    aliases=("subword",),
)
def fvt(problem: ApproximationProblem, *, subword_method: SubwordMethod = "mean") -> Approximation:
    """Pooled base rows of the pieces the base tokenizer splits the new token into."""
    splitter = BasePieces(problem)
    fallback = problem.base_mean()
    rows = problem.new_rows(problem.num_targets)
    for batch in target_batches(problem, "FVT"):
        token_ids = problem.target_ids[batch]
        for offset, ids in enumerate(splitter.batch(token_ids)):
            if not ids:
                rows[batch.start + offset] = fallback
                continue
            weights = pooling_weights(len(ids), subword_method, problem.is_lm_head)
            rows[batch.start + offset] = weights.to(rows) @ problem.base_rows(torch.tensor(ids))
    return Approximation(rows=rows)
