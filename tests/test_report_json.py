"""The report's JSON is pinned: typed records serialise to exactly the keys, order and values
of the golden files in ``tests/fixtures/reports`` (made from the dict-based report the typed
one replaced). Regenerate them only for an intended change of the format:
``MERGEKIT_OMP_WRITE_GOLDEN=1 pytest tests/test_report_json.py``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic_core import to_jsonable_python
from test_audit import planted_geometry, planted_problem

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.approximators import Approximation
from mergekit_omp.diagnostics.stage import audit_matrix
from mergekit_omp.kernels.omp import batch_omp
from mergekit_omp.merge.omp_vocabulary_task import OmpFill
from mergekit_omp.records import Record, omitted
from mergekit_omp.report import TransplantReport
from mergekit_omp.select.base import Choice

GOLDEN = Path(__file__).parent / "fixtures" / "reports"
WRITE = os.environ.get("MERGEKIT_OMP_WRITE_GOLDEN") == "1"


def without_times(value: Any, paths: dict[str, str]) -> Any:
    """The JSON without its ``seconds`` (the only part that differs between runs) and with
    the pair's temporary paths named by placeholders."""
    if isinstance(value, dict):
        return {k: without_times(v, paths) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_times(v, paths) for v in value]
    if isinstance(value, str):
        for path, name in paths.items():
            value = value.replace(path, name)
    return value


def check_golden(name: str, report: TransplantReport, paths: dict[str, str]) -> None:
    text = json.dumps(without_times(report.model_dump(mode="json"), paths), indent=2) + "\n"
    golden = GOLDEN / f"{name}.json"
    if WRITE:
        golden.write_text(text, encoding="utf-8")
    # Compared as text: the key order is part of the format.
    assert text == golden.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("omp_clip", {"method": "omp", "parameters": {"k": 8}, "guard": "clip"}),
        (
            "auto_leave_out",
            {
                "method": "auto",
                "parameters": {"candidates": ["omp:k=4", "fvt"], "validation": "leave_out"},
            },
        ),
        ("auto_text", {"method": "auto", "parameters": {"candidates": ["omp:k=4", "fvt"]}}),
    ],
)
def test_transplant_report_json_is_unchanged(mixed_pair, name, fields):
    base, donor = mixed_pair
    options = TransplantOptions(base_model=str(base), donor=str(donor), **fields)
    report = transplant(options, None, progress=False).report
    check_golden(name, report, {str(base): "BASE", str(donor): "DONOR"})


def test_audit_and_guard_json_of_a_planted_breaker_is_unchanged():
    problem = planted_problem(planted_geometry())
    indices, coeffs = batch_omp(problem.targets, problem.donor_anchors, 2)
    rows = problem.combine_base_anchors(indices, coeffs)
    approximation = Approximation(rows=rows, indices=indices, coeffs=coeffs)
    report = TransplantReport(base_model="BASE", donor="DONOR", options={})
    with torch.no_grad():
        audit_matrix(problem, approximation, report, matrix="lm_head", is_output=True, guard="clip")
    assert report.diagnostics  # the breaker is flagged and clipped
    check_golden("planted_breaker", report, {})


def test_a_failed_candidates_score_is_null_in_the_json_and_seconds_move_to_the_report():
    choice = Choice(
        chosen="fvt",
        method="fvt",
        parameters={},
        scores={"omp": float("inf"), "fvt": 1.5},
        validation="bits per byte",
        evidence="6 bytes of text",
        seconds=2.0,
    )
    report = TransplantReport(base_model="b", donor="d", options={})
    kept = report.choice_without_seconds("embed", choice)
    assert kept is not None and kept.scores["omp"] == float("inf")  # in Python, inf
    assert report.seconds == {"auto embed (within approximate)": 2.0}
    assert kept.model_dump(mode="json") == {
        "chosen": "fvt",
        "method": "fvt",
        "parameters": {},
        "scores": {"omp": None, "fvt": 1.5},
        "validation": "bits per byte",
        "evidence": "6 bytes of text",
    }
    # A merge's --report keeps the choice's seconds, and writes the failed score as null.
    fill = OmpFill(tensor="t", model="m", source="s", tokens=1, k=None, anchors=2, choice=choice)
    written = to_jsonable_python(asdict(fill), inf_nan_mode="null")["choice"]
    kept_keys = [name for name in Choice.model_fields if name != "scores_by_kind"]  # None here
    assert list(written) == kept_keys and written["scores"]["omp"] is None


def test_the_report_takes_one_more_optional_section_without_changing_its_json():
    class Section(Record):
        route: str

    class Extended(TransplantReport):
        omp: Section | None = omitted()

    plain = TransplantReport(base_model="b", donor="d", options={})
    assert Extended(base_model="b", donor="d", options={}).model_dump() == plain.model_dump()
    extended = Extended(base_model="b", donor="d", options={}, omp=Section(route="full_gram"))
    assert list(extended.model_dump())[-1] == "omp"
