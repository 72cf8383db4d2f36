"""Report stage: what a transplant matched, approximated and how long each stage took.

``TransplantReport`` is typed all the way down (``MatrixReport``, ``select.base.Choice``,
``diagnostics.records.Diagnostics``) and its JSON is ``model_dump(mode="json")``, pinned by
``tests/test_report_json.py``. A new top-level section is one optional field declared with
``records.omitted()``, e.g. ``omp: OmpRecord | None = omitted()``: reports without it keep
exactly the JSON they have.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mergekit_omp.diagnostics.records import Diagnostics
from mergekit_omp.diagnostics.summary import summary_lines, tokenizer_differences
from mergekit_omp.kernels.calibrate import MachineRates
from mergekit_omp.kernels.omp import OmpCall
from mergekit_omp.records import Record, omitted
from mergekit_omp.select.base import Choice


class MatrixReport(BaseModel):
    matrix: str
    tensor: str
    method: str
    parameters: dict[str, Any]
    byte_match: bool
    prefix_match: bool
    counts: dict[str, int]
    anchors: int
    rows: int
    choice: Choice | None = None
    """``-a auto``: the candidates, their validation scores and the one chosen (its
    ``seconds`` moved to the report's)."""


class OmpCallRecord(Record):
    """One OMP call of a transplant: its shapes, the route it took and why."""

    matrix: str
    targets: int
    anchors: int
    dim: int
    k: int
    route: str
    screened: bool
    chunk_tokens: int
    working_bytes: int
    budget_bytes: int
    estimated_seconds: dict[str, float]
    reason: str


class OmpRecord(Record):
    """The OMP calls of a transplant and the machine rates their plans were made from
    (``kernels/calibrate.py``); their seconds are under the report's ``seconds``."""

    calibration: MachineRates
    calls: list[OmpCallRecord]


TIMING_FIELDS = ("seconds",)
"""The report's only fields that differ between runs of the same transplant: every time
measured is under ``seconds``."""


class TransplantReport(BaseModel):
    base_model: str
    donor: str
    options: dict[str, Any]
    vocab_size: int = 0
    tied_embeddings: bool = False
    matrices: list[MatrixReport] = Field(default_factory=list)
    seconds: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    diagnostics: Diagnostics = Field(default_factory=Diagnostics)
    omp: OmpRecord | None = omitted()
    """Where OMP ran: each call's route and why (``kernels.omp.recorded_calls``)."""

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(
                self.seconds.get(stage, 0.0) + time.perf_counter() - start, 3
            )

    def record_omp(self, matrix: str, calls: list[OmpCall], rates: MachineRates) -> None:
        """``calls`` made for ``matrix`` into ``omp``; their time into ``seconds``, as a part
        of ``approximate`` (measured rates and routes stay the same between runs on one
        machine)."""
        if not calls:
            return
        records = [
            OmpCallRecord(
                matrix=matrix,
                **{
                    key: value
                    for key, value in call.to_dict().items()
                    if key not in ("seconds", "setup_seconds")
                },
            )
            for call in calls
        ]
        earlier = self.omp.calls if self.omp is not None else []
        self.omp = OmpRecord(calibration=rates, calls=[*earlier, *records])
        seconds = sum(call.seconds for call in calls)
        self.seconds[f"omp {matrix} (within approximate)"] = round(seconds, 3)

    def choice_without_seconds(self, matrix: str, choice: Choice | None) -> Choice | None:
        """``auto``'s choice for the report, its time moved to ``seconds`` (as a part of
        ``approximate``), so that everything else compares equal between runs."""
        if choice is None or choice.seconds is None:
            return choice
        self.seconds[f"auto {matrix} (within approximate)"] = choice.seconds
        return choice.model_copy(update={"seconds": None})

    def stage_seconds(self) -> float:
        """The time of the stages; parts of one (``auto embed (within approximate)``) and
        work beside them (``copy (overlapped)``) are noted in parentheses and not added."""
        return sum(value for key, value in self.seconds.items() if not key.endswith(")"))

    def write_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    def summary(self, out_path: str | None = None, verbose: bool = False) -> str:
        """At most 10 short lines: what was written where, how long it took, how the output
        tokenizer differs from the donor's, the counts, one line per warning. ``verbose``
        adds the tensors, seconds per stage, number schemes and the audit."""
        lines = [self.headline(out_path)]
        differences = tokenizer_differences(self.diagnostics)
        lines.append("  tokenizer: the donor's, " + ("; ".join(differences) or "unchanged"))
        lines.extend(self.count_lines())
        lines.extend(self.choice_lines(verbose))
        if verbose:
            lines.append(f"  tied embeddings: {'yes' if self.tied_embeddings else 'no'}")
            seconds = ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
            lines.append(f"  seconds: {seconds}")
            lines.extend(summary_lines(self.diagnostics))
        lines.extend(f"  warning: {w}" for w in self.warnings)
        if not verbose:
            where = f"{out_path}/{REPORT_FILE}" if out_path else "--report PATH"
            lines.append(f"  details: -v, or {where}")
        return "\n".join(lines)

    def choice_lines(self, verbose: bool = False) -> list[str]:
        """What ``auto`` chose per matrix: its score, and with ``verbose`` every candidate's
        and the whole validation note (the report always has them)."""
        lines = []
        for m in self.matrices:
            if m.choice is None:
                continue
            chosen, scores = m.choice.chosen, m.choice.scores
            if verbose:
                listed = ", ".join(f"{c} {s:.4f}" for c, s in scores.items())
                lines.append(
                    f"  {m.matrix}: auto chose {chosen} by {m.choice.validation}: {listed}"
                )
                continue
            measure = m.choice.validation.split(",")[0].split(";")[0]
            lines.append(
                f"  {m.matrix}: auto chose {chosen} ({measure} {scores[chosen]:.4f}, "
                f"best of {len(scores)})"
            )
        return lines

    def headline(self, out_path: str | None) -> str:
        seconds = self.stage_seconds()
        what = f"{model_name(self.base_model)} with the tokenizer of {model_name(self.donor)}"
        if out_path is None:
            return f"Audited {what}, nothing written ({seconds:.1f} s)"
        return f"Wrote {out_path}: {what} ({seconds:.1f} s)"

    def count_lines(self) -> list[str]:
        """One line for the vocabulary, per matrix only where the matrices differ."""
        described = [(m.matrix, matrix_counts(m)) for m in self.matrices]
        if len({text for _, text in described}) <= 1 and described:
            names = " and ".join(name for name, _ in described)
            return [f"  {self.vocab_size} tokens ({names}): {described[0][1]}"]
        head = [f"  {self.vocab_size} tokens"]
        return head + [f"  {name}: {text}" for name, text in described]


REPORT_FILE = "mergekit_omp_report.json"


def model_name(model: str) -> str:
    """A local model directory by its name (the summary's headline stays short)."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def matrix_counts(matrix: MatrixReport) -> str:
    counts = ", ".join(
        f"{value} {key}" for key, value in matrix.counts.items() if value and key != "approximated"
    )
    approximated = matrix.counts.get("approximated", 0)
    params = ", ".join(f"{k}={v}" for k, v in matrix.parameters.items() if v is not None)
    if matrix.choice is not None:  # the candidates and the choice have a line of their own
        params = f"{len(matrix.choice.scores)} candidates"
    method = f"{matrix.method} ({params})" if params else matrix.method
    return f"{counts}, {approximated} approximated by {method} from {matrix.anchors} anchors"
