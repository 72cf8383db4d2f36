"""OMP plus the mapped donor residual.

OMP writes a new token's donor row t as a k-sparse combination c of donor anchor rows and
gives it ``c @ base_anchors``; whatever of t those k anchors do not rebuild is dropped.
This method keeps it: the residual ``t - c @ donor_anchors`` is carried into the base
space by the global ridge map W of ``ridge.py`` and added,

    row = c @ base_anchors + (t - c @ donor_anchors) @ W.

Where OMP rebuilds t exactly the residual is zero and the row is OMP's; as k shrinks the
map carries more of the row, and k -> 0 is the ridge map itself (without its intercept,
which a difference of donor rows does not have). The same coefficients are OMP's, so
``indices``/``coeffs`` (for the audit) are OMP's too.
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
from mergekit_omp.approximators.omp import MemoryGb, omp
from mergekit_omp.approximators.ridge import DEFAULT_ALPHA, Alpha, RidgeMap, problem_ridge_map

SparseK = Annotated[int, Field(ge=1, le=4096)]
DEFAULT_K = 16


def coefficients(sparse: Approximation) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, coefficients) of an anchor-combination method's answer."""
    if sparse.indices is None or sparse.coeffs is None:
        raise ValueError("the approximation has no anchor coefficients")
    return sparse.indices, sparse.coeffs


MAP_CHUNK = 16384
"""New tokens whose residuals ``add_mapped_residual`` maps at a time."""


def add_mapped_residual(
    problem: ApproximationProblem,
    rows: torch.Tensor,
    indices: torch.Tensor,
    coeffs: torch.Tensor,
    mapping: RidgeMap,
) -> torch.Tensor:
    """``rows`` (``coeffs`` over anchors ``indices`` applied to the base anchors) plus the
    donor residual of the same combination mapped through ``mapping``, added in place.

    ``MAP_CHUNK`` rows at a time: the float64 residuals of 216,122 new tokens and their
    mapped rows would be 2 GB at once."""
    for start in range(0, rows.shape[0], MAP_CHUNK):
        stop = min(start + MAP_CHUNK, rows.shape[0])
        rebuilt = combine_anchor_rows(
            problem.donor_anchors, indices[start:stop], coeffs[start:stop]
        )
        residual = problem.targets[start:stop].to(rebuilt.dtype) - rebuilt
        rows[start:stop] += mapping.map_residual(residual).to(rows.dtype)
    return rows


@approximator("omp_ridge", pretty_name="OMP plus the ridge-mapped residual")
def omp_ridge(
    problem: ApproximationProblem,
    *,
    k: SparseK = DEFAULT_K,
    alpha: Alpha = DEFAULT_ALPHA,
    memory_gb: MemoryGb | None = None,
    screen: bool | None = None,
) -> Approximation:
    """OMP's anchor combination plus what it leaves of the donor row, mapped by ridge."""
    sparse = omp(problem, k=k, memory_gb=memory_gb, screen=screen)
    mapping = problem_ridge_map(problem, alpha)
    rows = add_mapped_residual(problem, sparse.rows, *coefficients(sparse), mapping)
    return Approximation(rows=rows, indices=sparse.indices, coeffs=sparse.coeffs)
