"""Readable lines for the end-of-run summary, from ``report.diagnostics`` (its typed records).

``tokenizer_differences`` says how the output tokenizer differs from the donor's (the
summary's second line and the model card); ``summary_lines`` is the full audit that ``-v``,
``mergekit-omp-report`` and the JSON report give.
"""

from __future__ import annotations

from mergekit_omp.diagnostics.numbers import NumberComparison
from mergekit_omp.diagnostics.records import AuditRecord, Diagnostics, TokenRecord
from mergekit_omp.readable import quoted

FLAGGED_SHOWN = 5


def digits(count: int) -> str:
    return f"{count} digit" if count == 1 else f"{count} digits"


def tokenizer_differences(diagnostics: Diagnostics) -> list[str]:
    """How the output tokenizer differs from the donor's, each with the flag that undoes it."""
    bos = diagnostics.bos
    if bos is None or bos.output_adds_bos == bos.donor_adds_bos:
        return []
    if bos.output_adds_bos:
        change = "inserts the BOS token first, as the base's does (the donor's does not)"
    else:
        change = "inserts no BOS token, as the base's (the donor's does)"
    return [f"{change}; --bos keep_donor keeps the donor's"]


def number_state(numbers: NumberComparison) -> str:
    """aligned; MISMATCHED (different schemes); or splits differ (same scheme, other merges)."""
    if numbers.aligned:
        return "aligned"
    if numbers.base.scheme != numbers.donor.scheme:
        return "MISMATCHED"
    return "splits differ"


def number_line(numbers: NumberComparison) -> str:
    base, donor = numbers.base, numbers.donor
    state = number_state(numbers)
    line = (
        f"  numbers: {state}: base {base.scheme} ({digits(base.max_digits_per_token)} "
        f"per token at most), donor {donor.scheme} ({digits(donor.max_digits_per_token)})"
    )
    if numbers.numeric_donor_tokens:
        line += (
            f"; {numbers.numeric_approximated} of {numbers.numeric_donor_tokens} "
            "numeric donor tokens approximated"
        )
    return line


def token_line(record: TokenRecord) -> str:
    parts = [f"{quoted(record.token)} (id {record.id})", f"norm {record.base_norm:g}"]
    parts.append(f"z {record.base_z:g}, donor z {record.donor_z:g}")
    for value, label in (
        (record.residual, "residual"),
        (record.coefficient_l1, "L1"),
        (record.condition, "cond"),
    ):
        if value is not None:
            parts.append(f"{label} {value:g}")
    if record.wins is not None:
        parts.append(f"argmax wins {record.wins}")
    if record.breaker:
        parts.append("BREAKER")
    return "    " + ", ".join(parts)


def audit_lines(matrix: str, audit: AuditRecord) -> list[str]:
    norm = audit.base_norm
    line = (
        f"  audit {matrix}: {audit.approximated} approximated rows, {audit.flagged} "
        f"flagged ({audit.breakers} breakers); norm bound {norm.bound:g} (median "
        f"{norm.median:g} + {norm.z_max:g} robust sd)"
    )
    if audit.guard is not None:
        line += f"; guard {audit.guard.mode}: {audit.guard.rows_changed} rows changed"
    lines = [line]
    if audit.flagged_tokens:
        lines.extend(token_line(r) for r in audit.flagged_tokens[:FLAGGED_SHOWN])
        hidden = audit.flagged - min(FLAGGED_SHOWN, len(audit.flagged_tokens))
        if hidden > 0:
            lines.append(f"    ... and {hidden} more (see the report's flagged_tokens)")
    elif audit.worst:
        lines.append("  largest:" + token_line(audit.worst[0])[3:])
    return lines


def summary_lines(diagnostics: Diagnostics) -> list[str]:
    lines = []
    if diagnostics.numbers is not None:
        lines.append(number_line(diagnostics.numbers))
    for matrix, audit in diagnostics.audit.items():
        lines.extend(audit_lines(matrix, audit))
    return lines
