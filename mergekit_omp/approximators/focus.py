"""FOCUS (Dobler and de Melo, EMNLP 2023, arXiv 2305.14481).

FOCUS initialises a new token as a combination of the overlapping tokens (those both
vocabularies share), weighted by ``sparsemax`` over the new token's cosine similarities to
them in an auxiliary fastText space trained on the target tokenizer's tokens. Sparsemax
(Martins and Astudillo, 2016) is a projection onto the probability simplex: the weights
sum to 1 and most of them are exactly 0. Tokens with no usable auxiliary vector are drawn
from N(mean, std) of the source embeddings, per dimension, as FOCUS does.

Adapted to this setting (one language, two tokenizers): the auxiliary space is the donor
model's embedding space, which already holds a vector for every donor token. A new token
whose donor row is all zero (no usable similarity) gets the random fallback, and anchors
whose donor row is zero take no part, as FOCUS prunes overlapping tokens without an
auxiliary vector. The sparsemax weights are applied to the anchors' base rows. Fallback
tokens report all-zero coefficients; their draws are seeded from the problem's seed.
"""

import torch

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator
from mergekit_omp.approximators.similarity import (
    AnchorSimilarity,
    no_targets,
    nonzero_rows,
    pad_columns,
    target_batches,
)

SUPPORT_GUESS = 64
"""Scores sorted per row at first; doubled while some row's support fills them."""


def sparsemax(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean projection of ``scores`` onto the probability simplex.

    ``-inf`` scores get weight 0. Every row needs at least one finite score.
    """
    ranked, _ = scores.sort(dim=1, descending=True)
    _, threshold = support_of_ranked(ranked)
    return (scores - threshold).clamp_min(0)


def support_of_ranked(ranked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support size and threshold tau of sparsemax, from each row's scores sorted descending.

    Exact for a row whose support is shorter than the sorted prefix given.
    """
    cumulative = ranked.cumsum(dim=1)
    ranks = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=ranked.dtype)
    # The support is the longest prefix of the ranked scores with 1 + r * z_(r) > sum_{j<=r} z_(j).
    support_size = (1 + ranks * ranked > cumulative).sum(dim=1, keepdim=True)
    threshold = (cumulative.gather(1, support_size - 1) - 1) / support_size
    return support_size, threshold


def sparse_sparsemax(
    scores: torch.Tensor, initial_width: int = SUPPORT_GUESS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparsemax(scores)`` as (indices, weights) of each row's nonzero weights.

    Only the top ``width`` scores of each row are sorted (a partial sort is much cheaper
    than a full one over tens of thousands of anchors); ``width`` doubles until every row's
    support is shorter than it, which makes the result exact.
    """
    width = min(initial_width, scores.shape[1])
    while True:
        ranked, indices = scores.topk(width, dim=1)
        support_size, threshold = support_of_ranked(ranked)
        if width == scores.shape[1] or bool((support_size < width).all()):
            break
        width = min(2 * width, scores.shape[1])
    keep = int(support_size.max())
    return indices[:, :keep], (ranked[:, :keep] - threshold).clamp_min(0)


def normal_like_base_rows(problem: ApproximationProblem, count: int) -> torch.Tensor:
    """``count`` rows drawn from N(mean, std) of the base rows, per dimension, seeded."""
    base = problem.work_base_matrix()
    mean, std = base.mean(dim=0).cpu(), base.std(dim=0).cpu()
    generator = torch.Generator(device="cpu").manual_seed(problem.seed)
    draws = torch.normal(mean.expand(count, -1), std.expand(count, -1), generator=generator)
    return draws.to(problem.base_anchors.device)


@approximator(
    "focus",
    pretty_name="FOCUS",
    reference_url="https://arxiv.org/abs/2305.14481",
)
def focus(problem: ApproximationProblem) -> Approximation:
    """Sparsemax-weighted anchors by cosine similarity in the donor space."""
    if problem.num_targets == 0:
        return no_targets(problem)
    usable_anchor = nonzero_rows(problem.donor_anchors)
    usable_target = nonzero_rows(problem.targets) & usable_anchor.any()
    similarity = AnchorSimilarity(problem)
    rows = problem.new_rows(problem.num_targets)
    parts = []
    for batch in target_batches(problem, "FOCUS"):
        scores = similarity(batch).masked_fill(~usable_anchor, float("-inf"))
        unusable = ~usable_target[batch]
        # A placeholder one-anchor support for fallback rows, whose weights are dropped.
        scores[unusable] = float("-inf")
        scores[unusable, 0] = 0.0
        indices, coeffs = sparse_sparsemax(scores)
        coeffs[unusable] = 0.0
        rows[batch] = problem.combine_base_anchors(indices, coeffs)
        parts.append((indices, coeffs))
    fallback = ~usable_target
    if fallback.any():
        rows[fallback] = normal_like_base_rows(problem, int(fallback.sum())).to(rows.dtype)
    indices, coeffs = pad_columns(parts)
    return Approximation(rows=rows, indices=indices, coeffs=coeffs)
