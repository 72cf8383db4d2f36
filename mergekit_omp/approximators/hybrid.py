"""Per-token hybrid of FVT and OMP plus the mapped residual, weighed by the token's own
evidence.

FVT (``fvt.py``) and OMP are both anchor combinations: FVT's are the pooling weights over
the base tokens that spell the new token's bytes, OMP's the k coefficients it finds in the
donor space. Where every FVT piece is an anchor, FVT's combination can be applied to the
donor anchor rows as well, and how far that lands from the token's own donor row says how
well composition describes this token (``\\n`` + eight spaces is its pieces; a name split
into syllables is not). Each combination gets its donor residual mapped through the ridge
map (``omp_ridge.py``), and the two rows are mixed with inverse-error weights:

    e_fvt = ||t - c_fvt @ donor_anchors|| / ||t||,  e_omp = omp_error_scale * (same for OMP)
    w_fvt = e_omp^2 / (e_fvt^2 + e_omp^2),  row = w_fvt * row_fvt + (1 - w_fvt) * row_omp.

OMP's error is fitted (its coefficients minimise it), FVT's is not, so OMP's counts
``omp_error_scale`` times; where FVT rebuilds the donor row exactly the row is FVT's.
Tokens whose pieces are not all anchors (or that have none) get OMP's row.
"""

from typing import Annotated

import torch
from pydantic import Field

from mergekit_omp.approximators.base import (
    Approximation,
    ApproximationProblem,
    approximator,
    combine_anchor_rows,
)
from mergekit_omp.approximators.fvt import BasePieces, SubwordMethod, pooling_weights
from mergekit_omp.approximators.omp import MemoryGb, omp
from mergekit_omp.approximators.omp_ridge import (
    DEFAULT_K,
    MAP_CHUNK,
    SparseK,
    add_mapped_residual,
    coefficients,
)
from mergekit_omp.approximators.ridge import DEFAULT_ALPHA, Alpha, problem_ridge_map
from mergekit_omp.approximators.similarity import NORM_EPS, target_batches

ErrorScale = Annotated[float, Field(gt=0.0, le=1e6)]


def fvt_anchor_combinations(
    problem: ApproximationProblem, subword_method: SubwordMethod
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FVT as anchor combinations: (indices, coefficients) padded to the longest split, and
    a mask of the tokens whose pieces are all anchors (others have all-zero coefficients)."""
    anchor_of = {base_id: j for j, base_id in enumerate(problem.base_anchor_ids)}
    splitter = BasePieces(problem)
    splits: list[list[int] | None] = []
    for batch in target_batches(problem, "FVT pieces"):
        for ids in splitter.batch(problem.target_ids[batch]):
            all_anchors = bool(ids) and all(i in anchor_of for i in ids)
            splits.append([anchor_of[i] for i in ids] if all_anchors else None)
    width = max((len(s) for s in splits if s), default=1)
    dtype = problem.targets.dtype
    indices = torch.zeros(len(splits), width, dtype=torch.long)
    coeffs = torch.zeros(len(splits), width, dtype=dtype)
    for row, anchors in enumerate(splits):
        if anchors:
            indices[row, : len(anchors)] = torch.tensor(anchors)
            weights = pooling_weights(len(anchors), subword_method, problem.is_lm_head)
            coeffs[row, : len(anchors)] = weights.to(dtype)
    composed = torch.tensor([s is not None for s in splits], dtype=torch.bool)
    device = problem.targets.device
    return indices.to(device), coeffs.to(device), composed.to(device)


def relative_error(
    problem: ApproximationProblem, indices: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    """||t - c @ donor_anchors|| / ||t|| per new token, ``MAP_CHUNK`` tokens at a time."""
    errors = []
    for start in range(0, indices.shape[0], MAP_CHUNK):
        stop = min(start + MAP_CHUNK, indices.shape[0])
        rebuilt = combine_anchor_rows(
            problem.donor_anchors, indices[start:stop], coeffs[start:stop]
        )
        targets = problem.targets[start:stop].to(rebuilt.dtype)
        errors.append((targets - rebuilt).norm(dim=1) / targets.norm(dim=1).clamp_min(NORM_EPS))
    return torch.cat(errors) if errors else problem.targets.new_empty(0)


def fvt_weights(e_fvt: torch.Tensor, e_omp: torch.Tensor, composed: torch.Tensor) -> torch.Tensor:
    """Inverse-squared-error weight of FVT's row; 1 where FVT is exact, 0 where not composed."""
    fvt_sq, omp_sq = e_fvt.square(), e_omp.square()
    total = fvt_sq + omp_sq
    weight = torch.where(total > 0, omp_sq / total.clamp_min(NORM_EPS**2), 0.5)
    weight = torch.where(fvt_sq == 0, 1.0, weight)
    return torch.where(composed, weight, 0.0)


@approximator("hybrid", pretty_name="FVT / OMP+residual hybrid")
def hybrid(
    problem: ApproximationProblem,
    *,
    k: SparseK = DEFAULT_K,
    alpha: Alpha = DEFAULT_ALPHA,
    omp_error_scale: ErrorScale = 30.0,
    subword_method: SubwordMethod = "mean",
    fvt_residual: bool = True,
    memory_gb: MemoryGb | None = None,
    screen: bool | None = None,
) -> Approximation:
    """FVT and OMP (each plus its mapped residual) mixed per token by their donor errors."""
    mapping = problem_ridge_map(problem, alpha)
    sparse = omp(problem, k=k, memory_gb=memory_gb, screen=screen)
    omp_indices, omp_coeffs = coefficients(sparse)
    omp_rows = add_mapped_residual(problem, sparse.rows, omp_indices, omp_coeffs, mapping)
    indices, coeffs, composed = fvt_anchor_combinations(problem, subword_method)
    fvt_rows = problem.combine_base_anchors(indices, coeffs)
    if fvt_residual:
        fvt_rows = add_mapped_residual(problem, fvt_rows, indices, coeffs, mapping)
    e_omp = omp_error_scale * relative_error(problem, omp_indices, omp_coeffs)
    e_fvt = relative_error(problem, indices, coeffs)
    weight = fvt_weights(e_fvt, e_omp, composed).unsqueeze(1).to(omp_rows.dtype)
    # weight * fvt + (1 - weight) * omp, in place.
    rows = fvt_rows.mul_(weight).add_(omp_rows.mul_(1 - weight))
    return Approximation(rows=rows, indices=omp_indices, coeffs=omp_coeffs)
