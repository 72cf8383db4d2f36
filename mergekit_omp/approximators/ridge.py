"""A global linear map from the donor space to the base space, fitted on the anchors.

One matrix W (D_donor x D_base) and, with ``center``, the two spaces' anchor means, by
ridge least squares over all anchor pairs:

    W = argmin ||(X - mean_X) W - (Y - mean_Y)||^2 + lambda ||W||^2,
    lambda = alpha * trace((X - mean_X)^T (X - mean_X)) / D_donor

(X: donor anchor rows, Y: base anchor rows). ``alpha`` is relative to the mean eigenvalue
of the anchors' Gram matrix, so one value means the same amount of shrinkage for any
embedding scale. A new token's base row is ``mean_Y + (t - mean_X) W``. The closed form
costs one D_donor x D_donor solve (about a second on the real pair). Linear maps between
embedding spaces are the classic cross-lingual alignment (Mikolov, Le and Sutskever,
arXiv 1309.4168); here both spaces are one language's, so no dictionary beyond the
anchors is needed.

``map_residual`` is what the OMP and hybrid methods add to their anchor combinations: the
part of a token's donor row their combination does not rebuild, mapped through W.
"""

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator

Alpha = Annotated[float, Field(ge=0.0, le=1e6)]
DEFAULT_ALPHA = 1e-2


@dataclass(frozen=True)
class RidgeMap:
    """``base ≈ base_mean + (donor - donor_mean) @ weight`` (float64)."""

    weight: torch.Tensor
    donor_mean: torch.Tensor
    base_mean: torch.Tensor

    def __call__(self, donor_rows: torch.Tensor) -> torch.Tensor:
        centred = donor_rows.to(self.weight) - self.donor_mean
        return (self.base_mean + centred @ self.weight).to(donor_rows.dtype)

    def map_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """The linear part only: a difference of donor rows maps without the means."""
        return (residual.to(self.weight) @ self.weight).to(residual.dtype)


def fit_ridge_map(
    donor_anchors: torch.Tensor,
    base_anchors: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    center: bool = True,
) -> RidgeMap:
    """The ridge map from donor anchor rows to base anchor rows (module docstring)."""
    x = donor_anchors.to(torch.float64)
    y = base_anchors.to(torch.float64)
    donor_mean = x.mean(dim=0) if center else x.new_zeros(x.shape[1])
    base_mean = y.mean(dim=0) if center else y.new_zeros(y.shape[1])
    x = x - donor_mean
    gram = x.T @ x
    shrinkage = alpha * gram.diagonal().sum() / gram.shape[0]
    gram.diagonal().add_(shrinkage)
    weight = solve_symmetric(gram, x.T @ (y - base_mean))
    return RidgeMap(weight=weight, donor_mean=donor_mean, base_mean=base_mean)


def solve_symmetric(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``gram^-1 rhs`` for a symmetric positive semi-definite ``gram``: by Cholesky where it
    is definite (any ``alpha > 0``), else the least-squares solution by SVD (``gelsd``).
    Both give the same bits on every run, which LAPACK's default ``gelsy`` does not on
    every CPU."""
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(gram, rhs, driver="gelsd").solution


def problem_ridge_map(problem: ApproximationProblem, alpha: float, center: bool = True) -> RidgeMap:
    return fit_ridge_map(problem.donor_anchors, problem.base_anchors, alpha, center)


@approximator("ridge", pretty_name="Ridge linear map")
def ridge(
    problem: ApproximationProblem,
    *,
    alpha: Alpha = DEFAULT_ALPHA,
    center: bool = True,
) -> Approximation:
    """One linear map from donor to base space, ridge least squares on all anchor pairs."""
    mapping = problem_ridge_map(problem, alpha, center)
    return Approximation(rows=mapping(problem.targets).to(problem.work_dtype))
