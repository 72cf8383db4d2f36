"""The diagnostics stage of a transplant, between approximate and assemble.

``audit_matrix`` measures one matrix's approximated rows, applies the guard and records
both in the report; ``check_numbers`` compares the two tokenizers' number schemes once.
Results go into ``report.diagnostics`` (``audit[matrix]``, an ``AuditRecord`` with its
``GuardRecord``, and ``numbers``), problems into ``report.warnings``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_omp.approximators import Approximation, ApproximationProblem
from mergekit_omp.diagnostics.audit import AuditSettings, RowAudit, audit_rows, token_text
from mergekit_omp.diagnostics.guard import GuardOutcome, apply_guard
from mergekit_omp.diagnostics.numbers import NumberComparison, compare_numbers
from mergekit_omp.load import LoadedModel
from mergekit_omp.match import VocabularyMatch
from mergekit_omp.options import GuardMode
from mergekit_omp.readable import quoted
from mergekit_omp.report import TransplantReport
from mergekit_omp.vocabulary import Vocabulary


@dataclass(frozen=True)
class MatrixDiagnosis:
    """The audit of one matrix's approximated rows, what the guard did, and the rows after."""

    audit: RowAudit
    guard: GuardOutcome
    after: RowAudit
    vocabulary: Vocabulary
    """The donor vocabulary the audit's token ids refer to."""


def audit_matrix(
    problem: ApproximationProblem,
    approximation: Approximation,
    report: TransplantReport,
    *,
    matrix: str,
    is_output: bool,
    guard: GuardMode,
    seed: int = 0,
    progress: bool = False,
    settings: AuditSettings | None = None,
) -> tuple[Approximation, MatrixDiagnosis | None]:
    """Audit, guard and record; returns the (possibly guarded) approximation."""
    if problem.num_targets == 0:
        return approximation, None
    settings = settings or AuditSettings(seed=seed)
    audit = audit_rows(
        problem,
        approximation,
        matrix=matrix,
        is_output=is_output,
        settings=settings,
        progress=progress,
    )
    outcome = apply_guard(problem, approximation, audit, guard)
    after = audit.with_rows(problem, outcome.approximation.rows) if outcome.changed.any() else audit
    guard_record = outcome.record(audit, after, problem.donor_vocab)
    record = audit.record(problem.donor_vocab).model_copy(update={"guard": guard_record})
    report.diagnostics.audit[matrix] = record
    if (warning := audit_warning(audit, outcome, after, problem)) is not None:
        report.warnings.append(warning)
    return outcome.approximation, MatrixDiagnosis(audit, outcome, after, problem.donor_vocab)


def audit_warning(
    audit: RowAudit, outcome: GuardOutcome, after: RowAudit, problem: ApproximationProblem
) -> str | None:
    flagged = int(audit.flagged.sum())
    if not flagged:
        return None
    flagged_positions = audit.flagged.nonzero().flatten()
    worst = int(flagged_positions[audit.base_z[flagged_positions].argmax()])
    token = quoted(token_text(problem.donor_vocab, audit.token_ids[worst]))
    if audit.flagged_norm[worst]:
        ratio = float(audit.base_norm[worst]) / audit.base_scale.median
        why = f"{ratio:.1f}x the median norm"
    else:
        salience = audit.salience
        assert salience is not None  # a row flagged only for salience has it
        why = (
            f"wins {int(salience.wins[worst])} of {salience.samples} sampled argmaxes "
            f"(real rows at most {salience.real_max_wins})"
        )
    breakers = int(audit.breakers.sum())
    message = (
        f"{audit.matrix}: {flagged} approximated row{'s' if flagged != 1 else ''} far beyond "
        f"the base's own ({breakers} breaker token{'s' if breakers != 1 else ''}, arXiv "
        f"2601.00065), worst {token}: {why}; "
    )
    if outcome.mode == "off":
        return message + "--guard clip or shrink bounds them"
    remaining = int(after.flagged.sum())
    tail = f", {remaining} still flagged" if remaining else ""
    return message + f"--guard {outcome.mode} bounded {int(outcome.changed.sum())}{tail}"


def check_numbers(
    base: LoadedModel, donor: LoadedModel, match: VocabularyMatch, report: TransplantReport
) -> NumberComparison:
    """Compare number schemes, count numeric tokens approximated, record and warn."""
    comparison = compare_numbers(
        base.tokenizer, donor.tokenizer, base.vocabulary, donor.vocabulary, match
    )
    report.diagnostics.numbers = comparison
    if (warning := comparison.warning()) is not None:
        report.warnings.append(warning)
    return comparison
