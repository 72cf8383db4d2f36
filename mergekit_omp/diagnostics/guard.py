"""The breaker guard: bound the rows the audit flags (``--guard clip|shrink|off``).

Each flagged row gets a target norm: the audit's bound (median + z_max x robust sd of the
real base rows) if its norm exceeds it, else, flagged for LM-head salience alone, the
median real norm (the length of a typical row).

- ``clip`` rescales the row to its target norm; its direction is kept.
- ``shrink`` re-solves the row's coefficients on the same selected donor anchors with a
  ridge penalty, ``c(lam) = argmin ||t - c A||^2 + lam ||c||^2``, taking the smallest
  ``lam`` whose base row ``c(lam) B`` is within the target norm, and applies them to the
  base anchors. Methods that give no coefficients are clipped instead.
- ``off`` leaves every row as the method made it (the audit still reports).

Rows not flagged are never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mergekit_omp.approximators import Approximation, ApproximationProblem
from mergekit_omp.diagnostics.audit import RowAudit, sig, token_text
from mergekit_omp.diagnostics.records import ChangedRow, GuardRecord
from mergekit_omp.options import GuardMode
from mergekit_omp.vocabulary import Vocabulary

TARGET_MARGIN = 1e-5
"""Targets sit this fraction under the bound, so that rounding to the output dtype cannot
leave a guarded row just over it."""
RIDGE_GRID = torch.logspace(-10, 6, 65, dtype=torch.float64)
"""Ridge penalties tried, as multiples of each token's mean Gram eigenvalue."""
BISECTION_STEPS = 40


@dataclass(frozen=True)
class GuardOutcome:
    mode: GuardMode
    approximation: Approximation
    changed: torch.Tensor
    target_norms: torch.Tensor
    ridge: torch.Tensor | None = None
    note: str | None = None

    def record(
        self, before: RowAudit, after: RowAudit, vocabulary: Vocabulary, listed: int = 20
    ) -> GuardRecord:
        """What the guard did, for the report: the first ``listed`` changed rows."""
        positions = self.changed.nonzero().flatten().tolist()
        rows = [
            ChangedRow(
                id=before.token_ids[position],
                token=token_text(vocabulary, before.token_ids[position]),
                norm_before=sig(before.base_norm[position]),
                norm_after=sig(after.base_norm[position]),
                ridge=None if self.ridge is None else sig(self.ridge[n]),
            )
            for n, position in enumerate(positions[:listed])
        ]
        return GuardRecord(
            mode=self.mode,
            rows_changed=len(positions),
            still_flagged=int(after.flagged.sum()),
            max_base_z_after=sig(after.base_z.max()),
            changed=rows,
            note=self.note or None,
        )


def target_norms(audit: RowAudit) -> torch.Tensor:
    """The norm each flagged row is brought to (inf for rows left alone)."""
    targets = torch.full_like(audit.base_norm, torch.inf)
    targets[audit.flagged] = audit.base_scale.median
    targets[audit.flagged_norm] = audit.bound
    return targets * (1 - TARGET_MARGIN)


def clip_rows(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows rescaled to at most their target norm."""
    norms = rows.double().norm(dim=1)
    factor = (targets.to(norms.device) / norms.clamp(min=1e-30)).clamp(max=1.0)
    return (rows.double() * factor.unsqueeze(1)).to(rows.dtype)


def ridge_norms(
    eigenvalues: torch.Tensor,
    rotated_target: torch.Tensor,
    base_gram: torch.Tensor,
    penalties: torch.Tensor,
) -> torch.Tensor:
    """Norm of the ridge base row of each token (F) at each penalty (F, P).

    With ``G = A A^T = Q diag(s) Q^T``, ``u = Q^T A t`` and ``M = Q^T B``:
    ``c(lam) = Q (u / (s + lam))`` and ``||c(lam) B||^2 = w^T (M M^T) w``, ``w = u / (s + lam)``.
    """
    weights = rotated_target.unsqueeze(1) / (eigenvalues.unsqueeze(1) + penalties.unsqueeze(-1))
    return torch.einsum("fpi,fij,fpj->fp", weights, base_gram, weights).clamp(min=0).sqrt()


def smallest_sufficient_ridge(
    eigenvalues: torch.Tensor,
    rotated_target: torch.Tensor,
    base_gram: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Per token, the smallest penalty on ``RIDGE_GRID`` (refined by bisection) that brings
    its base row within ``targets``; the returned penalty always satisfies the bound."""
    scale = eigenvalues.mean(dim=1, keepdim=True).clamp(min=1e-30)
    grid = scale * RIDGE_GRID.to(scale.device).unsqueeze(0)  # (F, P)
    within = ridge_norms(eigenvalues, rotated_target, base_gram, grid) <= targets.unsqueeze(1)
    first = torch.where(within.any(dim=1), within.to(torch.int8).argmax(dim=1), grid.shape[1] - 1)
    rows = torch.arange(grid.shape[0], device=grid.device)
    high = grid[rows, first]
    low = torch.where(first > 0, grid[rows, (first - 1).clamp(min=0)], high)
    for _ in range(BISECTION_STEPS):
        middle = (low * high).sqrt()
        ok = ridge_norms(eigenvalues, rotated_target, base_gram, middle.unsqueeze(1))[:, 0]
        ok = ok <= targets
        high = torch.where(ok, middle, high)
        low = torch.where(ok, low, middle)
    return high


def shrink_rows(
    problem: ApproximationProblem,
    indices: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge-refit rows, coefficients and penalties for the tokens at ``indices``' rows."""
    donor = problem.donor_anchors[indices].double()  # (F, k, D)
    base = problem.base_anchors[indices].double()  # (F, k, D_base)
    donor_targets = problem.targets.double()
    eigenvalues, vectors = torch.linalg.eigh(torch.bmm(donor, donor.transpose(1, 2)))
    eigenvalues = eigenvalues.clamp(min=0)
    projected = torch.bmm(donor, donor_targets.unsqueeze(-1)).squeeze(-1)  # A t
    rotated = torch.bmm(vectors.transpose(1, 2), projected.unsqueeze(-1)).squeeze(-1)
    rotated_base = torch.bmm(vectors.transpose(1, 2), base)
    base_gram = torch.bmm(rotated_base, rotated_base.transpose(1, 2))
    penalty = smallest_sufficient_ridge(
        eigenvalues, rotated, base_gram, targets.to(eigenvalues.device, torch.float64)
    )
    weights = rotated / (eigenvalues + penalty.unsqueeze(1))
    coeffs = torch.bmm(vectors, weights.unsqueeze(-1)).squeeze(-1)
    rows = torch.bmm(coeffs.unsqueeze(1), base).squeeze(1)
    return rows, coeffs, penalty.cpu()


def apply_guard(
    problem: ApproximationProblem,
    approximation: Approximation,
    audit: RowAudit,
    mode: GuardMode,
) -> GuardOutcome:
    """``approximation`` with its flagged rows bounded as ``mode`` says."""
    flagged = audit.flagged
    targets = target_norms(audit)
    unchanged = GuardOutcome(mode, approximation, torch.zeros_like(flagged), targets[flagged])
    if mode == "off" or not flagged.any():
        return unchanged
    rows = approximation.rows.clone()
    positions = flagged.nonzero().flatten().to(rows.device)
    if mode == "shrink" and approximation.indices is not None and approximation.coeffs is not None:
        sub_problem = _restricted(problem, positions)
        new_rows, new_coeffs, penalty = shrink_rows(
            sub_problem, approximation.indices[positions], targets[flagged]
        )
        rows[positions] = new_rows.to(rows.dtype)
        coeffs = approximation.coeffs.clone()
        coeffs[positions] = new_coeffs.to(coeffs.dtype)
        guarded = Approximation(rows=rows, indices=approximation.indices, coeffs=coeffs)
        return GuardOutcome(mode, guarded, flagged, targets[flagged], ridge=penalty)
    rows[positions] = clip_rows(rows[positions], targets[flagged])
    note = None
    if mode == "shrink":
        note = "the method gives no coefficients to shrink: flagged rows were clipped"
    guarded = Approximation(rows=rows, indices=approximation.indices, coeffs=approximation.coeffs)
    return GuardOutcome(mode, guarded, flagged, targets[flagged], note=note)


def _restricted(problem: ApproximationProblem, positions: torch.Tensor) -> ApproximationProblem:
    return replace(
        problem,
        targets=problem.targets[positions],
        target_ids=[problem.target_ids[i] for i in positions.tolist()],
    )
