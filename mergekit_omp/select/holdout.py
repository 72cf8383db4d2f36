"""Hiding anchors from the methods, to score them on rows whose answer is known: what
``auto``'s leave-out validation (``select/auto.py``) and ``mergekit-omp-eval``'s
(``evaluate/leave_out.py``) share.

Held-out tokens are hidden from every method, not only from the anchor set: their base rows
are replaced by the mean of the other base rows (``hidden_base_rows``), and they are dropped
from the base vocabulary (``vocabulary_without``, so FVT cannot spell a token with itself).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from mergekit_omp.errors import TransplantError, UsageValueError
from mergekit_omp.vocabulary import Vocabulary

DEFAULT_HOLDOUT_COUNT = 1000
DEFAULT_HOLDOUT_FRACTION = 0.05
COSINE_EPS = 1e-12
VOTERS = 8192
"""New tokens (a seeded sample, if there are more) whose nearest anchors ``like="new"`` counts."""
VOTE_BATCH = 1024


def holdout_size(anchors: int, holdout: float | None, *, exact: bool = False) -> int:
    """How many anchors to hold out: a count (>= 1), a fraction (< 1), or by default the
    smaller of 1,000 and 5% of the anchors. At least one anchor is always kept: a count
    that leaves none is cut to fit, or refused if ``exact`` (``mergekit-omp-eval``)."""
    if anchors < 2:
        raise TransplantError(
            f"leave-out validation needs at least 2 shared tokens, found {anchors}"
        )
    if holdout is None:
        size = min(DEFAULT_HOLDOUT_COUNT, math.ceil(DEFAULT_HOLDOUT_FRACTION * anchors))
    elif 0 < holdout < 1:
        size = math.ceil(holdout * anchors)
    elif holdout >= 1 and float(holdout).is_integer():
        size = int(holdout)
        if exact and size >= anchors:
            raise UsageValueError(
                f"--holdout {size} is not fewer than the {anchors} shared tokens: give a "
                f"count of at most {anchors - 1}, or a fraction"
            )
    else:
        raise TransplantError(
            f"--holdout must be a whole number of tokens or a fraction in (0, 1), got {holdout}"
        )
    return max(1, min(size, anchors - 1))


def nearest_anchor_counts(
    new_rows: torch.Tensor, anchor_rows: torch.Tensor, seed: int
) -> torch.Tensor:
    """For each anchor row, how many of ``new_rows`` (up to ``VOTERS``, a seeded sample)
    have it as their nearest anchor by cosine."""
    if new_rows.shape[0] > VOTERS:
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(new_rows.shape[0], generator=generator)[:VOTERS].sort().values
        new_rows = new_rows[picked.to(new_rows.device)]
    anchors = F.normalize(anchor_rows.float(), dim=1)
    counts = torch.zeros(anchor_rows.shape[0], dtype=torch.long, device=anchor_rows.device)
    for start in range(0, new_rows.shape[0], VOTE_BATCH):
        batch = F.normalize(new_rows[start : start + VOTE_BATCH].float(), dim=1)
        nearest = (batch @ anchors.T).argmax(dim=1)
        counts += torch.bincount(nearest, minlength=anchor_rows.shape[0])
    return counts


def hidden_base_rows(base_matrix: torch.Tensor, base_ids: list[int]) -> torch.Tensor:
    """The base matrix with the held-out rows replaced by the mean of the other rows."""
    hidden = torch.zeros(base_matrix.shape[0], dtype=torch.bool, device=base_matrix.device)
    hidden[base_ids] = True
    masked = base_matrix.clone()
    masked[hidden] = base_matrix[~hidden].mean(dim=0).to(base_matrix.dtype)
    return masked


def vocabulary_without(vocab: Vocabulary, token_ids: list[int]) -> Vocabulary:
    removed = set(token_ids)
    return dataclasses.replace(
        vocab,
        forms={i: f for i, f in vocab.forms.items() if i not in removed},
        strings={i: s for i, s in vocab.strings.items() if i not in removed},
    )


def mean_cosine(rows: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over tokens of cos(approximated row, true row); a zero row scores 0."""
    return F.cosine_similarity(rows.double(), truth.double(), dim=1, eps=COSINE_EPS).mean().item()
