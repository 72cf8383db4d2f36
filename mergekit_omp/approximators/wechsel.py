"""WECHSEL (Minixhofer, Paischer and Rekabsaz, NAACL 2022, arXiv 2112.06598).

WECHSEL initialises a new token from the k source tokens nearest to it in an aligned
auxiliary space (fastText word vectors mapped across languages), weighted by
``softmax(cosine similarity / temperature)``; the paper uses k = 10 and temperature 0.1.

Adapted to this setting (one language, two tokenizers): the auxiliary space is the donor
model's own embedding space, where new tokens and anchors already live together, so no
alignment is needed. The k anchors nearest to a new token by cosine similarity in the
donor space get the softmax weights, which are applied to those anchors' base rows.
"""

from typing import Annotated

import torch
from pydantic import Field

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator
from mergekit_omp.approximators.similarity import AnchorSimilarity, no_targets, target_batches


def softmax_top_k(
    similarities: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` most similar anchors and their ``softmax(sim / T)`` weights."""
    top, indices = similarities.topk(k, dim=1)
    return indices, torch.softmax(top / temperature, dim=1)


@approximator(
    "wechsel",
    pretty_name="WECHSEL",
    reference_url="https://arxiv.org/abs/2112.06598",
)
def wechsel(
    problem: ApproximationProblem,
    *,
    k: Annotated[int, Field(ge=1)] = 10,
    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.1,
) -> Approximation:
    """Softmax-weighted k nearest anchors by cosine similarity in the donor space."""
    if problem.num_targets == 0:
        return no_targets(problem)
    k = min(k, problem.donor_anchors.shape[0])
    similarity = AnchorSimilarity(problem)
    rows, indices, coeffs = [], [], []
    for batch in target_batches(problem, "WECHSEL"):
        batch_indices, batch_coeffs = softmax_top_k(similarity(batch), k, temperature)
        rows.append(problem.combine_base_anchors(batch_indices, batch_coeffs))
        indices.append(batch_indices)
        coeffs.append(batch_coeffs)
    return Approximation(rows=torch.cat(rows), indices=torch.cat(indices), coeffs=torch.cat(coeffs))
