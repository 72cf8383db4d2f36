"""Audit of approximated rows: breaker tokens (asymmetric realizability, arXiv 2601.00065).

A coefficient method writes a new token's donor row ``t`` as ``c @ donor_anchors[S]`` and
gives it the base row ``c @ base_anchors[S]``. The same ``c`` can land in very different
places in the two spans: two anchors nearly collinear in the donor but far apart in the
base let large opposite coefficients rebuild an ordinary ``t`` while the base row comes out
huge. Such a "breaker" is ordinary in the donor and extreme in the base, and it can be
planted on purpose. For every approximated row we measure

- the donor-space residual ``||t - c @ donor_anchors[S]|| / ||t||`` and ``||c||_1``,
- the condition number of the selected donor anchors ``donor_anchors[S]`` (k x D),
- the base-row norm as a robust z-score against the real (anchor) base rows, and the
  donor-row norm likewise against the donor anchors (ordinary there = a breaker),
- for output matrices (LM head, or tied embeddings), how often the row would win the
  argmax over sampled hidden states, against how often real rows do.

Methods without coefficients get the last two only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from mergekit_omp.approximators import Approximation, ApproximationProblem
from mergekit_omp.diagnostics.records import (
    AuditRecord,
    FlaggedFor,
    NormBound,
    Quantiles,
    SalienceRecord,
    TokenRecord,
)
from mergekit_omp.readable import readable_bytes, readable_text
from mergekit_omp.vocabulary import Vocabulary

MAD_TO_SD = 1.4826
"""Scale of the median absolute deviation to the standard deviation of a normal."""
MAX_CONDITION = 1e16
"""Condition numbers are reported up to float64's resolution; singular selections get this."""


@dataclass(frozen=True)
class AuditSettings:
    """Thresholds of the audit (see docs/diagnostics.md for how each default was chosen)."""

    z_max: float = 8.0
    """A row whose norm's robust z-score exceeds this is flagged."""
    min_relative_spread: float = 3 / 16
    """Floor of the robust sd, as a share of the median norm: with ``z_max`` 8, no row under
    2.5 times the median norm is flagged. Real rows of real models reach 2.4 times
    (SmolLM2-135M), so a shorter row is within what real rows do; bases of near-normalized
    rows (Gemma-3) would otherwise flag rows 1% longer than typical."""
    salience_samples: int = 512
    """Hidden states sampled to count argmax wins (output matrices)."""
    salience_basis: int = 2048
    """Real rows the hidden states are drawn over."""
    salience_ratio: float = 40.0
    """A flagged row wins this many times its fair share (samples / rows) or more ..."""
    min_salience_wins: int = 5
    """... and at least this many times, and more often than any real row."""
    condition_sample: int | None = 4096
    """Rows whose anchor conditioning is computed (plus every listed row); None: all."""
    condition_budget: float = 4096 * 64**2 * (64 + 640)
    """Most work (sampled rows x k^2 (k + D)) spent on conditioning: 4096 rows at k = 64,
    D = 640. Methods with wide supports (FOCUS's sparsemax keeps hundreds of anchors) get
    a proportionally smaller sample; listed rows are always measured."""
    top: int = 10
    """Worst tokens listed in the report."""
    max_listed: int = 100
    """Flagged tokens listed in the report (all are counted)."""
    chunk_elements: int = 1 << 22
    """Work tensors are cut into chunks of about this many elements (4M: the conditioning's
    float64 copies then stay near 50 MB, below the OMP state, so the audit never sets a
    transplant's peak memory; 16M added 0.24 GB on Gemma-3 <- SmolLM2)."""
    seed: int = 0


@dataclass(frozen=True)
class RobustScale:
    """Median and robust sd (1.4826 x MAD, floored) of a set of row norms."""

    median: float
    spread: float
    count: int

    def z(self, values: torch.Tensor) -> torch.Tensor:
        return (values.double() - self.median) / self.spread

    def bound(self, z_max: float) -> float:
        return self.median + z_max * self.spread


def robust_scale(values: torch.Tensor, min_relative_spread: float) -> RobustScale:
    values = values.double()
    median = torch.quantile(values, 0.5).item()
    mad = torch.quantile((values - median).abs(), 0.5).item()
    spread = max(MAD_TO_SD * mad, min_relative_spread * abs(median), 1e-12)
    return RobustScale(median=median, spread=spread, count=values.numel())


def row_norms(rows: torch.Tensor, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """Euclidean norm of each row in float64, on the CPU, a few rows at a time: small float64
    copies are reused from the heap, where large ones are fresh pages each time (46,018 rows
    of width 3,840: 0.06 s in chunks of 2 MB, 2.1 s in chunks of 126 MB)."""
    chunk = max(1, chunk_elements // max(1, rows.shape[1]))
    return torch.cat([part.double().norm(dim=1).cpu() for part in rows.split(chunk)])


def chunk_size(per_item: int, settings: AuditSettings) -> int:
    return max(1, settings.chunk_elements // max(1, per_item))


def selection_condition(selected: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Condition numbers of each token's selected anchors (B, k, D), from their Gram matrix.

    Anchors with a zero coefficient (``active`` false) are decoupled: their Gram row and
    column are zeroed and their diagonal set to the largest active diagonal, which lies
    between the active block's extreme eigenvalues and so changes neither.
    """
    selected = selected.double() * active.unsqueeze(-1)
    gram = torch.bmm(selected, selected.transpose(1, 2))
    diagonal = torch.diagonal(gram, dim1=1, dim2=2)
    fill = diagonal.amax(dim=1, keepdim=True)
    fill = torch.where(fill > 0, fill, torch.ones_like(fill))  # nothing active: cond 1
    gram = gram + torch.diag_embed(torch.where(active, torch.zeros_like(diagonal), fill))
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    largest = eigenvalues[:, -1]
    smallest = eigenvalues[:, 0].maximum(largest / MAX_CONDITION**2)
    return (largest / smallest).sqrt()


def coefficient_stats(
    problem: ApproximationProblem,
    indices: torch.Tensor,
    coeffs: torch.Tensor,
    settings: AuditSettings,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Donor-space relative residual and L1 norm of the coefficients of every row."""
    count, k = indices.shape
    step = chunk_size(k * problem.donor_anchors.shape[1], settings)
    residual = torch.empty(count, dtype=torch.float64)
    starts = range(0, count, step)
    for start in tqdm(starts, desc="audit residuals", disable=not progress or len(starts) < 2):
        end = min(start + step, count)
        selected = problem.donor_anchors[indices[start:end]]  # (B, k, D)
        rebuilt = torch.bmm(coeffs[start:end].unsqueeze(1).to(selected.dtype), selected)
        targets = problem.targets[start:end]
        error = (targets - rebuilt.squeeze(1)).double().norm(dim=1)
        scale = targets.double().norm(dim=1)
        residual[start:end] = torch.where(scale > 0, error / scale.clamp(min=1e-30), error).cpu()
    return residual, coeffs.double().abs().sum(dim=1).cpu()


def conditioning(
    problem: ApproximationProblem,
    indices: torch.Tensor,
    coeffs: torch.Tensor,
    positions: torch.Tensor,
    settings: AuditSettings,
    progress: bool = False,
) -> torch.Tensor:
    """Condition numbers of the selected donor anchors of the rows at ``positions``; NaN
    for the others.

    Cost: a k x k float64 Gram matrix and its eigenvalues per row, O(k^2 D): about 2 ms a
    row for k = 64, D = 576 on 2 CPU cores (7 ms for D = 2048), hence a sample by default.
    """
    result = torch.full((indices.shape[0],), math.nan, dtype=torch.float64)
    k = indices.shape[1]
    step = chunk_size(k * problem.donor_anchors.shape[1], settings)
    chunks = positions.split(step)
    for chunk in tqdm(chunks, desc="audit conditioning", disable=not progress or len(chunks) < 2):
        on_device = chunk.to(indices.device)
        selected = problem.donor_anchors[indices[on_device]]
        result[chunk] = selection_condition(selected, coeffs[on_device] != 0).cpu()
    return result


def condition_positions(
    count: int, listed: torch.Tensor, settings: AuditSettings, k: int, dim: int
) -> torch.Tensor:
    """A seeded sample of rows plus ``listed``: ``settings.condition_sample`` rows (all if
    None), fewer where k^2 (k + D) per row would exceed ``settings.condition_budget``."""
    affordable = max(1, int(settings.condition_budget // (k * k * (k + dim))))
    size = min(
        affordable, count if settings.condition_sample is None else settings.condition_sample
    )
    if size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(settings.seed)
    sample = torch.randperm(count, generator=generator)[:size]
    return torch.unique(torch.cat([sample, listed]))


def sample_hidden_states(real_rows: torch.Tensor, settings: AuditSettings) -> torch.Tensor:
    """Gaussian hidden states with the second moment of (a sample of) the real rows."""
    generator = torch.Generator().manual_seed(settings.seed)
    basis_ids = torch.randperm(real_rows.shape[0], generator=generator)[: settings.salience_basis]
    weights = torch.randn(settings.salience_samples, basis_ids.numel(), generator=generator)
    basis = real_rows[basis_ids.to(real_rows.device)].float()
    return (weights.to(basis.device) @ basis) / math.sqrt(basis_ids.numel())


def argmax_wins(
    hidden: torch.Tensor, blocks: list[torch.Tensor], settings: AuditSettings
) -> torch.Tensor:
    """How many of the hidden states each row wins the argmax of the logits for; the rows
    are those of ``blocks`` one after another (never copied into one matrix)."""
    best_value = torch.full((hidden.shape[0],), -math.inf, device=hidden.device)
    best_index = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    step = chunk_size(hidden.shape[0] + hidden.shape[1], settings)
    offset = 0
    for rows in blocks:
        for start in range(0, rows.shape[0], step):
            value, index = (hidden @ rows[start : start + step].float().T).max(dim=1)
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index + offset + start, best_index)
        offset += rows.shape[0]
    return torch.bincount(best_index.cpu(), minlength=offset)


@dataclass(frozen=True)
class Salience:
    """Argmax wins of the approximated rows over sampled hidden states."""

    wins: torch.Tensor
    real_max_wins: int
    samples: int
    rows: int

    def flagged(self, settings: AuditSettings) -> torch.Tensor:
        fair_share = self.samples / self.rows
        return (
            (self.wins > self.real_max_wins)
            & (self.wins >= settings.min_salience_wins)
            & (self.wins >= settings.salience_ratio * fair_share)
        )


def lm_head_salience(
    real_rows: torch.Tensor, new_rows: torch.Tensor, settings: AuditSettings
) -> Salience:
    hidden = sample_hidden_states(real_rows, settings)
    wins = argmax_wins(hidden, [real_rows, new_rows.to(real_rows.device)], settings)
    real = real_rows.shape[0]
    return Salience(
        wins=wins[real:],
        real_max_wins=int(wins[:real].max().item()),
        samples=settings.salience_samples,
        rows=real + new_rows.shape[0],
    )


@dataclass(frozen=True)
class RowAudit:
    """Per-row measurements of one matrix's approximated rows, and which are outliers."""

    matrix: str
    token_ids: list[int]
    settings: AuditSettings
    base_scale: RobustScale
    donor_scale: RobustScale
    real_norms: torch.Tensor
    base_norm: torch.Tensor
    donor_norm: torch.Tensor
    residual: torch.Tensor | None = None
    coeff_l1: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    salience: Salience | None = None

    @property
    def bound(self) -> float:
        """The largest base-row norm not flagged: median + z_max x robust sd of real rows."""
        return self.base_scale.bound(self.settings.z_max)

    @property
    def base_z(self) -> torch.Tensor:
        return self.base_scale.z(self.base_norm)

    @property
    def donor_z(self) -> torch.Tensor:
        return self.donor_scale.z(self.donor_norm)

    @property
    def flagged_norm(self) -> torch.Tensor:
        return self.base_z > self.settings.z_max

    @property
    def flagged_salience(self) -> torch.Tensor:
        if self.salience is None:
            return torch.zeros_like(self.flagged_norm)
        return self.salience.flagged(self.settings)

    @property
    def flagged(self) -> torch.Tensor:
        return self.flagged_norm | self.flagged_salience

    @property
    def breakers(self) -> torch.Tensor:
        """Flagged rows whose donor row is ordinary: the asymmetric ones."""
        return self.flagged & (self.donor_z.abs() <= self.settings.z_max)

    def with_rows(self, problem: ApproximationProblem, rows: torch.Tensor) -> RowAudit:
        """The same audit of new base rows (after a guard); donor-side measures are kept."""
        salience = None
        if self.salience is not None:
            salience = lm_head_salience(problem.base_anchors, rows, self.settings)
        return replace(self, base_norm=row_norms(rows), salience=salience)

    def listed_positions(self) -> torch.Tensor:
        """Rows the report lists: the ``top`` largest base z-scores and the flagged rows."""
        order = torch.argsort(self.base_z, descending=True, stable=True)
        flagged = order[self.flagged[order]][: self.settings.max_listed]
        return torch.cat([order[: self.settings.top], flagged])

    def token_record(self, position: int, vocabulary: Vocabulary) -> TokenRecord:
        token_id = self.token_ids[position]
        measured = {
            name: sig(values[position])
            for name, values in (
                ("residual", self.residual),
                ("coefficient_l1", self.coeff_l1),
                ("condition", self.condition),
            )
            if values is not None and not math.isnan(values[position])
        }
        reasons = [
            name
            for name, mask in (
                ("base_norm", self.flagged_norm),
                ("salience", self.flagged_salience),
            )
            if mask[position]
        ]
        return TokenRecord(
            id=token_id,
            token=token_text(vocabulary, token_id),
            base_norm=sig(self.base_norm[position]),
            base_z=sig(self.base_z[position]),
            donor_z=sig(self.donor_z[position]),
            **measured,
            wins=None if self.salience is None else int(self.salience.wins[position]),
            flagged_for=reasons or None,
            breaker=bool(self.breakers[position]) if reasons else None,
        )

    def record(self, vocabulary: Vocabulary) -> AuditRecord:
        """The audit for the report: counts, the bound, spreads, the worst and the flagged
        rows (the guard's record is added by the diagnostics stage)."""
        flagged = self.flagged
        order = torch.argsort(self.base_z, descending=True, stable=True).tolist()
        flagged_order = [i for i in order if flagged[i]]
        salience = None
        if self.salience is not None:
            salience = SalienceRecord(
                samples=self.salience.samples,
                rows=self.salience.rows,
                real_max_wins=self.salience.real_max_wins,
                max_wins=int(self.salience.wins.max()),
            )
        return AuditRecord(
            approximated=len(self.token_ids),
            flagged=int(flagged.sum()),
            breakers=int(self.breakers.sum()),
            flagged_for=FlaggedFor(
                base_norm=int(self.flagged_norm.sum()),
                salience=int(self.flagged_salience.sum()),
            ),
            base_norm=NormBound(
                real_rows=self.base_scale.count,
                median=sig(self.base_scale.median),
                robust_sd=sig(self.base_scale.spread),
                z_max=self.settings.z_max,
                bound=sig(self.bound),
                real_rows_above_bound=int((self.real_norms > self.bound).sum()),
            ),
            distributions={
                name: quantiles(values)
                for name, values in (
                    ("base_norm", self.base_norm),
                    ("base_z", self.base_z),
                    ("donor_z", self.donor_z),
                    ("residual", self.residual),
                    ("coefficient_l1", self.coeff_l1),
                    ("condition", self.condition),
                )
                if values is not None
            },
            worst=[self.token_record(i, vocabulary) for i in order[: self.settings.top]],
            flagged_tokens=[
                self.token_record(i, vocabulary) for i in flagged_order[: self.settings.max_listed]
            ],
            condition_measured=(
                None if self.condition is None else int((~self.condition.isnan()).sum())
            ),
            salience=salience,
        )


def audit_rows(
    problem: ApproximationProblem,
    approximation: Approximation,
    *,
    matrix: str,
    is_output: bool,
    settings: AuditSettings | None = None,
    progress: bool = False,
) -> RowAudit:
    """Measure every approximated row of ``problem`` (see the module docstring)."""
    settings = settings or AuditSettings()
    real_norms = row_norms(problem.base_anchors)
    audit = RowAudit(
        matrix=matrix,
        token_ids=list(problem.target_ids),
        settings=settings,
        base_scale=robust_scale(real_norms, settings.min_relative_spread),
        donor_scale=robust_scale(row_norms(problem.donor_anchors), settings.min_relative_spread),
        real_norms=real_norms,
        base_norm=row_norms(approximation.rows),
        donor_norm=row_norms(problem.targets),
    )
    if is_output:
        audit = replace(
            audit, salience=lm_head_salience(problem.base_anchors, approximation.rows, settings)
        )
    if approximation.indices is not None and approximation.coeffs is not None:
        residual, l1 = coefficient_stats(
            problem, approximation.indices, approximation.coeffs, settings, progress
        )
        positions = condition_positions(
            len(audit.token_ids),
            audit.listed_positions(),
            settings,
            k=approximation.indices.shape[1],
            dim=problem.donor_anchors.shape[1],
        )
        condition = conditioning(
            problem, approximation.indices, approximation.coeffs, positions, settings, progress
        )
        audit = replace(audit, residual=residual, coeff_l1=l1, condition=condition)
    return audit


def sig(value: float | torch.Tensor, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits, for the JSON report."""
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def quantiles(values: torch.Tensor) -> Quantiles:
    """Spread of ``values`` (NaN entries, rows not measured, left out)."""
    values = values.double()
    values = values[~values.isnan()]
    if values.numel() == 0:
        return Quantiles()
    points = torch.quantile(values, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return Quantiles(
        min=sig(values.min()),
        median=sig(points[0]),
        p90=sig(points[1]),
        p99=sig(points[2]),
        max=sig(values.max()),
    )


def token_text(vocabulary: Vocabulary, token_id: int) -> str:
    """The token as readable text: its bytes, with non-UTF-8 bytes and control characters
    escaped (``\\xe2``, ``\\n``), never U+FFFD."""
    form = vocabulary.forms.get(token_id)
    if form is None:
        return readable_text(vocabulary.strings.get(token_id, ""))
    return readable_bytes(form.data)
