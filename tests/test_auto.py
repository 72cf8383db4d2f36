"""auto: the validation set it cuts from a problem, and that it runs the best candidate."""

from __future__ import annotations

import weakref

import pytest
import torch
from tiny import linear_world, problem_of

from mergekit_omp.approximators import get_approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.select import ChosenApproximation
from mergekit_omp.select.auto import (
    TEXT_VALIDATION,
    held_out_positions,
    validation_problem,
)
from mergekit_omp.vocabulary import Encoding, TokenForm, TokenKind, Vocabulary


def vocab_of(ids: range) -> Vocabulary:
    forms = {i: TokenForm(TokenKind.TEXT, f"t{i}".encode()) for i in ids}
    return Vocabulary(
        forms=forms, strings={i: f"t{i}" for i in ids}, special_ids={}, encoding=Encoding.PLAIN
    )


def linear_problem(seed: int = 0):
    anchors, targets, mapping, offset = linear_world(anchors=60, targets=9, seed=seed)
    base = anchors @ mapping + offset
    return problem_of(targets, anchors, base, base_vocab=vocab_of(range(60))), mapping, offset


def test_the_anchors_nearest_the_new_tokens_are_held_out_first():
    anchors = torch.eye(6, dtype=torch.float64)
    targets = torch.tensor([[0.0, 0, 3, 0.1, 0, 0], [0.1, 0, 2, 0, 0, 0], [0, 0, 0, 0, 1, 0.2]])
    problem = problem_of(targets, anchors, torch.randn(6, 2, dtype=torch.float64))
    assert held_out_positions(problem, 1, seed=0) == [2]
    assert sorted(held_out_positions(problem, 2, seed=0)) == [2, 4]
    assert len(held_out_positions(problem, 100, seed=0)) == 5  # at least one anchor stays


def test_by_default_the_smaller_of_1000_and_5_percent_of_the_anchors_are_held_out():
    problem, _, _ = linear_problem()  # 60 anchors
    assert len(held_out_positions(problem, None, seed=0)) == 3
    result = get_approximator("auto")(problem, candidates=("zero", "mean"))
    assert result.choice.evidence == "3 held-out tokens"


def test_held_out_anchors_are_hidden_from_the_methods():
    problem, _, _ = linear_problem()
    validation = validation_problem(problem, 7, seed=0)
    held = validation.problem.target_ids
    assert len(held) == 7 and not set(held) & set(validation.problem.base_anchor_ids)
    assert not set(held) & set(validation.problem.base_vocab.forms)
    kept = [i for i in range(60) if i not in set(held)]
    hidden_rows = validation.problem.base_matrix[held]
    assert torch.allclose(hidden_rows, problem.base_matrix[kept].mean(dim=0).expand_as(hidden_rows))
    assert torch.equal(validation.truth, problem.base_anchors[held])
    assert torch.equal(validation.problem.targets, problem.donor_anchors[held])


def test_auto_runs_the_candidate_that_rebuilds_the_held_out_anchors_best():
    problem, mapping, offset = linear_problem()
    result = get_approximator("auto")(
        problem, candidates=("zero", "ridge:alpha=0", "mean"), holdout=10
    )  # no base model to run: leave-out validation
    assert isinstance(result, ChosenApproximation)
    assert result.choice.chosen == "ridge:alpha=0"
    assert result.choice.method == "ridge"
    assert result.choice.scores["ridge:alpha=0"] == pytest.approx(1.0)
    assert result.choice.scores["zero"] == 0.0
    assert result.choice.evidence == "10 held-out tokens"
    assert result.choice.validation.startswith("leave-out mean cosine")
    assert "could not be run: the problem has no base model path" in result.choice.validation
    assert torch.allclose(result.rows, problem.targets @ mapping + offset, atol=1e-9)


def test_auto_prefers_the_first_of_equal_candidates_and_refuses_itself():
    problem, _, _ = linear_problem()
    result = get_approximator("auto")(problem, candidates=("zero", "zero:"), holdout=5)
    assert result.choice.chosen == "zero"
    with pytest.raises(TransplantError, match="its own candidate"):
        get_approximator("auto").validate_parameters({"candidates": ["auto"]})


def test_a_transplant_with_auto_records_the_choice_in_report_and_card(tmp_path, mixed_pair):
    from mergekit_omp import TransplantOptions, transplant

    base, donor = mixed_pair
    options = TransplantOptions(
        base_model=str(base),
        donor=str(donor),
        method="auto",
        parameters={"candidates": ["omp:k=4", "fvt", "zero"], "holdout": 20},
    )
    result = transplant(options, tmp_path / "out", progress=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert result.report.matrices
    for matrix in result.report.matrices:
        assert matrix.method == "auto"
        assert set(matrix.choice.scores) == {"omp:k=4", "fvt", "zero"}
        scores = matrix.choice.scores
        assert matrix.choice.validation == TEXT_VALIDATION
        assert matrix.choice.chosen == min(scores, key=scores.get)
        assert all(0 <= score < 100 for score in scores.values())  # bits per byte behind
        assert set(matrix.choice.scores_by_kind) == {"omp:k=4", "fvt", "zero"}
        chosen = matrix.choice.chosen
        assert f"`auto` chose `{chosen}` from 3 candidates by regret, bits per byte" in card
    short = [line for line in result.report.summary().splitlines() if "auto chose" in line]
    assert len(short) == len(result.report.matrices)
    assert all("best of 3)" in line and len(line) <= 100 for line in short)
    full = [
        line for line in result.report.summary(verbose=True).splitlines() if "auto chose" in line
    ]
    assert all(all(spec in line for spec in ("omp:k=4", "fvt", "zero")) for line in full)


def test_auto_parameters_are_checked_when_the_options_are_made(tmp_path):
    from pydantic import ValidationError

    from mergekit_omp import TransplantOptions
    from mergekit_omp.options import describe_validation_error

    def refusal(candidates) -> str:
        missing = str(tmp_path / "no-such-model")  # never read: the options refuse first
        with pytest.raises(ValidationError) as info:
            TransplantOptions(
                base_model=missing, donor=missing, parameters={"candidates": candidates}
            )
        return describe_validation_error(info.value)

    assert refusal(["fvt", "hybird"]).startswith(
        "parameters.candidates: candidate 'hybird': unknown approximation method 'hybird' "
        "(did you mean 'hybrid'?"
    )
    assert "candidate 'omp:k=0': bad parameters for method 'omp': k:" in refusal(["omp:k=0"])
    assert "its own candidate" in refusal(["auto"])
    assert "at least one candidate" in refusal([])


def test_auto_has_one_constant_for_each_limit():
    from mergekit_omp.select import auto, text

    fields = get_approximator("auto").parameters.model_fields
    assert fields["max_run_parameters"].default == text.MAX_RUN_PARAMETERS
    assert fields["candidates"].default == auto.CANDIDATES
    with pytest.raises(TransplantError, match="less than or equal to 100000"):
        get_approximator("auto").validate_parameters({"holdout": auto.MAX_HOLDOUT + 1})


class ScriptedScorer:
    """Scores each candidate's rows in turn with the next entry of ``script``, and checks
    that no earlier candidate's rows are still held."""

    def __init__(self, script: list[dict[str, float]]) -> None:
        self.script, self.seen, self.alive = list(script), [], []
        self.released = False

    def release(self) -> None:
        self.released = True

    def kind_bits_per_byte(self, rows: torch.Tensor) -> dict[str, float]:
        assert not self.released
        assert not [ref for ref in self.alive if ref() is not None]
        self.seen.append(rows.clone())
        self.alive.append(weakref.ref(rows))
        return self.script[len(self.seen) - 1]


@pytest.mark.parametrize("winner", [0, 1, 2])
def test_auto_by_text_returns_the_winners_rows_holding_one_candidate_at_a_time(winner):
    from mergekit_omp.select.auto import by_text_bits_per_byte

    problem, _, _ = linear_problem()
    candidates = ("mean", "omp:k=2", "omp_ridge:k=2")
    script = [{"prose": 2.0, "code": 2.0} for _ in candidates]
    script[winner] = {"prose": 1.0, "code": 1.5}
    scorer = ScriptedScorer(script)
    best, result, regrets, table = by_text_bits_per_byte(problem, candidates, scorer)
    scorer.alive.clear()
    assert best == candidates[winner]
    assert scorer.released == (winner != len(candidates) - 1)  # its model gone before the rerun
    assert regrets == {spec: (0.0 if spec == best else 1.0) for spec in candidates}
    assert table[best] == script[winner]
    assert torch.equal(result.rows, scorer.seen[winner])
    name, _, parameter = best.partition(":")
    alone = get_approximator(name)(problem, **({"k": 2} if parameter else {}))
    assert torch.equal(result.rows, alone.rows)
    assert not scorer.seen[winner].equal(scorer.seen[(winner + 1) % 3])
