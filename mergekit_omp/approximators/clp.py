"""CLP-Transfer (Ostendorff and Rehm, 2023, arXiv 2301.09626).

CLP-Transfer builds a large model for a new tokenizer from a large source model and a
small helper model that already uses the new tokenizer: a token missing from the source
vocabulary gets the average of the source rows of the overlapping tokens, weighted by its
cosine similarity to each of them in the helper model's embedding space, the weights
normalised to sum to 1 (``w = sim / sum(sim)`` over all overlapping tokens in the
reference implementation).

Adapted to this setting (one language, two tokenizers): the donor model is the helper (it
has the donor tokenizer), the base model is the source, and the overlapping tokens are the
anchors. With ``k`` set, only the k most similar anchors take part (the weights are then
also returned as coefficients); without it, all anchors do, as in the paper, and only the
rows are returned (a dense coefficient matrix over every anchor would not fit in memory
for a large vocabulary). A token whose similarities do not sum to a positive number cannot
be normalised and gets equal weights over its anchors.
"""

from typing import Annotated

import torch
from pydantic import Field

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator
from mergekit_omp.approximators.similarity import (
    NORM_EPS,
    AnchorSimilarity,
    no_targets,
    target_batches,
)


def normalised(similarities: torch.Tensor) -> torch.Tensor:
    """``sim / sum(sim)`` per row; rows whose sum is not positive get equal weights."""
    totals = similarities.sum(dim=1, keepdim=True)
    uniform = torch.full_like(similarities, 1.0 / similarities.shape[1])
    return torch.where(totals > NORM_EPS, similarities / totals.clamp_min(NORM_EPS), uniform)


@approximator(
    "clp",
    pretty_name="CLP-Transfer",
    reference_url="https://arxiv.org/abs/2301.09626",
)
def clp(
    problem: ApproximationProblem, *, k: Annotated[int, Field(ge=1)] | None = None
) -> Approximation:
    """Anchors weighted by normalised cosine similarity in the donor space (all, or top k)."""
    if problem.num_targets == 0:
        return no_targets(problem)
    similarity = AnchorSimilarity(problem)
    if k is None:
        return weighted_over_all_anchors(problem, similarity)
    return weighted_over_top_anchors(problem, similarity, min(k, problem.donor_anchors.shape[0]))


def weighted_over_all_anchors(
    problem: ApproximationProblem, similarity: AnchorSimilarity
) -> Approximation:
    base_anchors = problem.work_base_anchors()
    rows = []
    for batch in target_batches(problem, "CLP"):
        scores = similarity(batch)
        rows.append(normalised(scores) @ base_anchors.to(scores.dtype))
    return Approximation(rows=torch.cat(rows))


def weighted_over_top_anchors(
    problem: ApproximationProblem, similarity: AnchorSimilarity, top_k: int
) -> Approximation:
    rows, indices, coeffs = [], [], []
    for batch in target_batches(problem, "CLP"):
        top, batch_indices = similarity(batch).topk(top_k, dim=1)
        batch_coeffs = normalised(top)
        rows.append(problem.combine_base_anchors(batch_indices, batch_coeffs))
        indices.append(batch_indices)
        coeffs.append(batch_coeffs)
    return Approximation(rows=torch.cat(rows), indices=torch.cat(indices), coeffs=torch.cat(coeffs))
