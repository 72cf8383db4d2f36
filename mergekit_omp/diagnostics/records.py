"""The diagnostics of a report as typed records (``report.diagnostics``).

Each record's fields are its JSON keys, in the order the report writes them; a key the report
has only sometimes is ``omitted()`` while it is ``None``. The audit makes ``AuditRecord``
(``RowAudit.record``), the guard ``GuardRecord``, the plan ``BosRecord``, the number probe
``NumberComparison``; ``summary.py`` and the model card read them by attribute.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mergekit_omp.diagnostics.numbers import NumberComparison
from mergekit_omp.records import JsonFloat, Record, omitted


class TokenRecord(Record):
    """One listed row: its token, norms and scores, and why it was flagged (if it was)."""

    id: int
    token: str
    base_norm: JsonFloat
    base_z: JsonFloat
    donor_z: JsonFloat
    residual: JsonFloat | None = omitted()
    coefficient_l1: JsonFloat | None = omitted()
    condition: JsonFloat | None = omitted()
    wins: int | None = omitted()
    """Argmax wins over the sampled hidden states (output matrices)."""
    flagged_for: list[str] | None = omitted()
    breaker: bool | None = omitted()


class FlaggedFor(Record):
    base_norm: int
    salience: int


class NormBound(Record):
    """The real base rows' norms and the bound drawn from them."""

    real_rows: int
    median: JsonFloat
    robust_sd: JsonFloat
    z_max: JsonFloat
    bound: JsonFloat
    real_rows_above_bound: int


class Quantiles(Record):
    """Spread of one measure over the approximated rows (empty where none was measured)."""

    min: JsonFloat | None = omitted()
    median: JsonFloat | None = omitted()
    p90: JsonFloat | None = omitted()
    p99: JsonFloat | None = omitted()
    max: JsonFloat | None = omitted()


class SalienceRecord(Record):
    samples: int
    rows: int
    real_max_wins: int
    max_wins: int


class ChangedRow(Record):
    """A row the guard changed."""

    id: int
    token: str
    norm_before: JsonFloat
    norm_after: JsonFloat
    ridge: JsonFloat | None = omitted()


class GuardRecord(Record):
    """What ``--guard`` did to one matrix's flagged rows."""

    mode: str
    rows_changed: int
    still_flagged: int
    max_base_z_after: JsonFloat
    changed: list[ChangedRow]
    note: str | None = omitted()


class AuditRecord(Record):
    """The audit of one matrix's approximated rows (``report.diagnostics.audit[matrix]``)."""

    approximated: int
    flagged: int
    breakers: int
    flagged_for: FlaggedFor
    base_norm: NormBound
    distributions: dict[str, Quantiles]
    worst: list[TokenRecord]
    flagged_tokens: list[TokenRecord]
    condition_measured: int | None = omitted()
    salience: SalienceRecord | None = omitted()
    guard: GuardRecord | None = omitted()


class BosRecord(Record):
    """Whether each tokenizer inserts a BOS token first."""

    base_adds_bos: bool
    donor_adds_bos: bool
    output_adds_bos: bool


class Diagnostics(BaseModel):
    """``report.diagnostics``: filled by the plan (``bos``, ``multimodal_tokens``), the audit
    of each matrix and the number probe, in that order; not frozen, as the stages fill it."""

    model_config = ConfigDict(extra="forbid")

    bos: BosRecord | None = omitted()
    multimodal_tokens: dict[str, int] | None = omitted()
    audit: dict[str, AuditRecord] = Field(default_factory=dict, exclude_if=lambda audit: not audit)
    numbers: NumberComparison | None = omitted()
