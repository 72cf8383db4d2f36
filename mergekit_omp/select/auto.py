"""Choose the method for this matrix by running the model: each candidate's transplant is
scored by bits per byte on each kind of validation text, and the one least far behind the
best on its worst kind wins (minimax regret).

Each candidate approximates the new tokens; its rows are put into the base model, which is
run with the donor's tokenizer on texts every Python installation has (five kinds: prose,
reference with code examples, code, quotes, tables; ``select/text.py``), each kind scored on
its own. A candidate's regret is its largest loss, in bits per byte, against the best
candidate of each kind (``minimax_regret``); the smallest regret is kept, so a candidate
that is best on average but far behind on one kind of text loses to one that is close to
the best on every kind. Candidates built on OMP with the same k share one OMP run
(``omp.shared_omp_runs``); only one candidate's rows are held at a time, so the winner is
run again after the scoring (its OMP shared: only its cheap part repeats). The model is the
one ``SelectionContext.base_path`` names, its rows laid out from
``SelectionContext.matched_ids`` (``text.TextScorer``), loaded once the first candidate has
run, so that it is not held beside OMP's working memory. Where the model
cannot be run (no base model path, no validation text, a model ``transformers`` cannot
build) or ``validation="leave_out"``, the choice falls back to leave-out validation on
anchors like the new tokens (below), and the record says why.

Leave-out: ``holdout`` anchors are set aside as a validation set: the anchors that are the
nearest (cosine, donor space) of the most new tokens, as ``mergekit-omp-eval``'s
``--holdout-like new`` picks them. They are hidden as in its leave-out (``holdout.py``):
removed from the anchors, their base rows replaced by the mean of the others, dropped from
the base vocabulary (so FVT cannot spell a token with itself). Each candidate approximates
them from the remaining anchors; the one whose rows have the highest mean cosine with the
true base rows is then run on the real new tokens.

The candidates, their scores and the choice are returned with the rows
(``ChosenApproximation.choice``) and go into the report and the model card. Every
parameter, the candidates included (each looked up and its parameters checked), is
validated when the options are made, before any model is read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from mergekit_omp.approximators.base import Approximation, ApproximationProblem
from mergekit_omp.approximators.omp import shared_omp_runs
from mergekit_omp.approximators.spec import parse_method_spec
from mergekit_omp.errors import TransplantError
from mergekit_omp.select.base import (
    Choice,
    ChosenApproximation,
    SelectionContext,
    Selector,
    selector,
)
from mergekit_omp.select.holdout import (
    hidden_base_rows,
    holdout_size,
    mean_cosine,
    nearest_anchor_counts,
    vocabulary_without,
)
from mergekit_omp.select.text import MAX_RUN_PARAMETERS, TextScorer, ValidationUnavailable

LOG = logging.getLogger(__name__)

CANDIDATES = (
    "hybrid",
    "hybrid:omp_error_scale=1",
    "omp_ridge",
    "fvt",
    "omp:k=16",
)
"""``NAME[:PARAM=VALUE,...]`` specs, in order of preference on equal scores."""
MAX_HOLDOUT = 100_000
"""The most anchors leave-out validation holds out (``holdout``)."""
TEXT_VALIDATION = (
    "regret, bits per byte behind the best candidate on the kind of validation text where "
    "it is furthest behind (minimax regret), lower is better"
)
LEAVE_OUT_VALIDATION = "leave-out mean cosine on anchors like the new tokens, higher is better"


def checked_candidates(candidates: tuple[str, ...]) -> tuple[str, ...]:
    """At least one candidate, each an installed method (not a selector) with valid
    parameters; an error names the candidate (an unknown name with its close matches)."""
    if not candidates:
        raise PydanticCustomError("candidates", "auto needs at least one candidate method")
    for spec in candidates:
        try:
            parsed = parse_method_spec(spec)
        except TransplantError as exc:
            raise PydanticCustomError(
                "candidates", "candidate '{spec}': {message}", {"spec": spec, "message": str(exc)}
            ) from None
        if isinstance(parsed.approximator, Selector):
            raise PydanticCustomError(
                "candidates",
                "candidate '{spec}' chooses among methods: auto cannot be its own candidate",
                {"spec": spec},
            )
    return candidates


Candidates = Annotated[tuple[str, ...], AfterValidator(checked_candidates)]
HoldoutCount = Annotated[int, Field(ge=1, le=MAX_HOLDOUT)]
ValidationKind = Literal["text", "leave_out"]


@dataclass(frozen=True)
class Validation:
    """A held-out problem cut from a real one, and the true base rows of its targets."""

    problem: ApproximationProblem
    truth: torch.Tensor


def held_out_positions(problem: ApproximationProblem, size: int | None, seed: int) -> list[int]:
    """Anchor positions to hold out (``size`` base tokens, by default the smaller of 1,000
    and 5% of them, ``holdout.holdout_size``): the base tokens nearest the most new tokens
    first, then a seeded random order; every anchor position of a chosen base token."""
    counts = nearest_anchor_counts(problem.targets, problem.donor_anchors, seed).tolist()
    votes: dict[int, int] = {}
    for position, base_id in enumerate(problem.base_anchor_ids):
        votes[base_id] = votes.get(base_id, 0) + counts[position]
    distinct = sorted(votes)
    size = holdout_size(len(distinct), size)
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -votes[distinct[i]])
    chosen = {distinct[i] for i in order[:size]}
    return [j for j, base_id in enumerate(problem.base_anchor_ids) if base_id in chosen]


def validation_problem(problem: ApproximationProblem, size: int | None, seed: int) -> Validation:
    """The problem with ``held_out_positions`` as its targets, hidden from every method."""
    held = held_out_positions(problem, size, seed)
    held_set = set(held)
    keep = [j for j in range(len(problem.base_anchor_ids)) if j not in held_set]
    held_base = [problem.base_anchor_ids[j] for j in held]
    device = problem.donor_anchors.device
    keep_t, held_t = torch.tensor(keep, device=device), torch.tensor(held, device=device)
    validation = dataclasses.replace(
        problem,
        targets=problem.donor_anchors[held_t],
        donor_anchors=problem.donor_anchors[keep_t],
        base_anchors=problem.base_anchors[keep_t],
        base_matrix=hidden_base_rows(problem.base_matrix, held_base),
        target_ids=[problem.donor_anchor_ids[j] for j in held],
        donor_anchor_ids=[problem.donor_anchor_ids[j] for j in keep],
        base_anchor_ids=[problem.base_anchor_ids[j] for j in keep],
        base_vocab=vocabulary_without(problem.base_vocab, held_base),
        progress=False,
    )
    return Validation(validation, problem.base_anchors[held_t])


def score_candidates(validation: Validation, candidates: tuple[str, ...]) -> dict[str, float]:
    """Mean cosine of each candidate's rows with the held-out true rows (failures: -inf)."""
    scores: dict[str, float] = {}
    for spec in candidates:
        parsed = parse_method_spec(spec)
        try:
            rows = parsed.approximator(validation.problem, **parsed.parameters).rows
        except TransplantError as exc:
            LOG.warning("auto: candidate %s failed on the validation set: %s", spec, exc)
            scores[spec] = float("-inf")
            continue
        scores[spec] = round(mean_cosine(rows, validation.truth), 6)
    return scores


def minimax_regret(table: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """The candidate whose largest loss against the best candidate on any kind is the
    smallest, and each candidate's largest loss (its regret).

    ``table`` is ``{candidate: {kind: bits per byte}}``, candidates in order of preference;
    regrets are rounded to 1e-6 and the first of equals wins. A candidate with a kind
    missing or not finite has an infinite regret; a kind no candidate scores finitely is
    left out."""
    kinds = {kind for scores in table.values() for kind in scores}
    best = {
        kind: min(s[kind] for s in table.values() if math.isfinite(s.get(kind, math.inf)))
        for kind in kinds
        if any(math.isfinite(s.get(kind, math.inf)) for s in table.values())
    }
    regrets = {}
    for spec, scores in table.items():
        losses = [scores.get(kind, math.inf) - low for kind, low in best.items()]
        worst = max(losses, default=math.inf)
        regrets[spec] = round(worst, 6) if math.isfinite(worst) else math.inf
    chosen = min(table, key=lambda spec: regrets[spec])  # first of equals wins
    return chosen, regrets


def by_text_bits_per_byte(
    problem: ApproximationProblem, candidates: tuple[str, ...], scorer: TextScorer
) -> tuple[str, Approximation, dict[str, float], dict[str, dict[str, float]]]:
    """Each candidate run on the new tokens and scored by ``scorer`` on each kind of text;
    the one with the smallest largest loss against the best on any kind wins
    (``minimax_regret``). Returns it, its rows, the regrets and the bits per byte per
    kind.

    Only one candidate's rows are held at a time: the winner, unless it ran last, is run
    again, which repeats only its part after OMP (the OMP runs are shared), once the scorer
    has released its model."""
    table: dict[str, dict[str, float]] = {}
    ran: list[str] = []
    with shared_omp_runs():
        last: Approximation | None = None
        for spec in candidates:
            last = None
            parsed = parse_method_spec(spec)
            try:
                last = parsed.approximator(problem, **parsed.parameters)
            except TransplantError as exc:
                LOG.warning("auto: candidate %s failed: %s", spec, exc)
                table[spec] = {}
                continue
            ran.append(spec)
            scores = scorer.kind_bits_per_byte(last.rows)
            table[spec] = {
                kind: round(bpb, 6) if math.isfinite(bpb) else math.inf
                for kind, bpb in scores.items()
            }
            LOG.info("auto: %s scores %s bits per byte on the validation texts", spec, table[spec])
        if not ran:
            raise TransplantError(f"auto: every candidate failed ({', '.join(candidates)})")
        best, regrets = minimax_regret(table)
        if best not in ran:  # every candidate that ran failed on some kind
            best = ran[0]
        if last is None or best != ran[-1]:
            last = None
            scorer.release()
            parsed = parse_method_spec(best)
            last = parsed.approximator(problem, **parsed.parameters)
    return best, last, regrets, table


def text_scorer(
    problem: ApproximationProblem, context: SelectionContext, max_parameters: int
) -> tuple[TextScorer | None, str | None]:
    """(the text scorer, None), or (None, why the model cannot be run)."""
    try:
        return TextScorer(problem, context, max_parameters=max_parameters, load=False), None
    except ValidationUnavailable as exc:
        LOG.warning("auto: %s; choosing by leave-out validation instead", exc)
        return None, str(exc)


def by_leave_out(
    problem: ApproximationProblem, candidates: tuple[str, ...], holdout: int | None
) -> tuple[str, Approximation, dict[str, float], int]:
    """The candidate with the best leave-out mean cosine, run on the new tokens; and how many
    anchors were held out."""
    held = validation_problem(problem, holdout, problem.seed)
    scores = score_candidates(held, candidates)
    best = max(candidates, key=lambda spec: scores[spec])  # first of equals wins
    parsed = parse_method_spec(best)
    return best, parsed.approximator(problem, **parsed.parameters), scores, held.problem.num_targets


@selector("auto", pretty_name="Chosen by validation")
def auto(
    problem: ApproximationProblem,
    context: SelectionContext,
    *,
    candidates: Candidates = CANDIDATES,
    validation: ValidationKind = "text",
    holdout: HoldoutCount | None = None,
    max_run_parameters: Annotated[int, Field(ge=0)] = MAX_RUN_PARAMETERS,
) -> ChosenApproximation:
    """The candidate whose transplant is least far behind the best candidate, in bits per
    byte, on the kind of validation text where it is furthest behind."""
    candidates = tuple(candidates)
    start = time.perf_counter()
    scorer, unavailable = None, None
    by_kind: dict[str, dict[str, float]] = {}
    if validation == "text":
        scorer, unavailable = text_scorer(problem, context, max_run_parameters)
    if scorer is not None:
        try:
            best, result, scores, by_kind = by_text_bits_per_byte(problem, candidates, scorer)
            evidence = (
                f"{sum(len(t.encode()) for t in scorer.texts.values())} bytes of text: "
                + ", ".join(scorer.texts)
            )
            how = TEXT_VALIDATION
        except ValidationUnavailable as exc:
            LOG.warning("auto: %s; choosing by leave-out validation instead", exc)
            scorer, unavailable = None, str(exc)
    if scorer is None:
        best, result, scores, held_out = by_leave_out(problem, candidates, holdout)
        evidence = f"{held_out} held-out tokens"
        how = LEAVE_OUT_VALIDATION
        if unavailable:
            how += f"; the model could not be run: {unavailable}"
    chosen = parse_method_spec(best)
    choice = Choice(
        chosen=best,
        method=chosen.approximator.name,
        parameters=chosen.parameters,
        scores=scores,
        validation=how,
        evidence=evidence,
        scores_by_kind=by_kind or None,
        seconds=round(time.perf_counter() - start, 3),
    )
    LOG.info("auto: %s %s; chose %s", how, scores, best)
    return ChosenApproximation(
        rows=result.rows, indices=result.indices, coeffs=result.coeffs, choice=choice
    )
