"""Shared by the similarity-weighted baselines (WECHSEL, FOCUS, CLP): cosine similarity of
new tokens to the anchors in the donor space, a batch of targets at a time, and the
sparse (indices, coefficients) form their weights take.

Nothing here holds a (targets x anchors) matrix for the whole problem: each batch of
``problem.batch_size`` targets is compared with all anchors, weighted and combined before
the next batch starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import tqdm

from mergekit_omp.approximators.base import (
    DEFAULT_BATCH_SIZE,
    Approximation,
    ApproximationProblem,
)

NORM_EPS = 1e-12


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; all-zero rows stay zero (cosine 0 with everything)."""
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def nonzero_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Boolean mask of rows whose norm is above the zero threshold."""
    return matrix.norm(dim=1) > NORM_EPS


def no_targets(problem: ApproximationProblem) -> Approximation:
    """The answer to a problem with nothing to approximate."""
    rows = problem.new_rows(0)
    empty = torch.zeros(0, 0, dtype=torch.long, device=rows.device)
    return Approximation(rows=rows, indices=empty, coeffs=rows.new_zeros(0, 0))


def target_batches(problem: ApproximationProblem, description: str) -> Iterator[slice]:
    """Slices of the problem's targets, ``problem.batch_size`` at a time, with a progress bar."""
    total = problem.num_targets
    size = problem.batch_size or DEFAULT_BATCH_SIZE
    starts = range(0, total, size)
    bar = tqdm.tqdm(
        starts,
        desc=description,
        total=len(starts),
        unit="batch",
        disable=not problem.progress,
        leave=False,
    )
    for start in bar:
        yield slice(start, min(start + size, total))


class AnchorSimilarity:
    """Cosine similarity of target rows to the donor anchor rows, one batch at a time."""

    def __init__(self, problem: ApproximationProblem) -> None:
        self.problem = problem
        self.unit_anchors = unit_rows(problem.donor_anchors)

    def __call__(self, batch: slice) -> torch.Tensor:
        """(batch, anchors) cosine similarities."""
        return unit_rows(self.problem.targets[batch]) @ self.unit_anchors.T


def pad_columns(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-batch (indices, coeffs) of different widths, padding with zero weights.

    A padded slot points at anchor 0 with coefficient 0, so it changes no row.
    """
    if not parts:
        return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0)
    width = max(indices.shape[1] for indices, _ in parts)
    all_indices, all_coeffs = [], []
    for indices, coeffs in parts:
        missing = width - indices.shape[1]
        all_indices.append(torch.nn.functional.pad(indices, (0, missing), value=0))
        all_coeffs.append(torch.nn.functional.pad(coeffs, (0, missing), value=0.0))
    return torch.cat(all_indices), torch.cat(all_coeffs)
