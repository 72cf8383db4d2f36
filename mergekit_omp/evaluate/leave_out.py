"""Leave-out validation: how well would each method rebuild rows whose answer we know?

A sample of the anchors (tokens both models share) is held out: removed from the anchor
set and treated as new tokens. Each method approximates them from the remaining anchors,
and its rows are compared with their true base rows. No model is run. Which anchors
(``like``):

* ``random``: a seeded random sample;
* ``new``: the anchors that look most like the transplant's new tokens, i.e. those that are
  the nearest anchor (cosine, in the donor space) of the most new tokens. Random anchors are
  on average shorter and more frequent than new tokens, so their scores can rank methods
  differently from bits per byte (docs/evaluate.md).

The held-out tokens are hidden from every method, not only from the anchor set: their base
rows are replaced by the mean of the other base rows (so the ``mean`` baseline and FOCUS's
fallback statistics do not see them, to within that mean), and they are dropped from the
base vocabulary the problem carries (so FVT cannot split a held-out token into itself).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel

from mergekit_omp.approximate import approximate_new_rows, build_problem, selection_context
from mergekit_omp.approximators import ApproximationProblem, Approximator
from mergekit_omp.load import LoadedModel
from mergekit_omp.match import VocabularyMatch
from mergekit_omp.options import TransplantOptions
from mergekit_omp.plan import plan_transplant
from mergekit_omp.select.base import SelectionContext
from mergekit_omp.select.holdout import (
    COSINE_EPS,
    hidden_base_rows,
    holdout_size,
    mean_cosine,
    nearest_anchor_counts,
    vocabulary_without,
)

HoldoutLike = Literal["random", "new"]


@dataclass(frozen=True)
class HeldOut:
    """Anchors removed from the anchor set: donor ids and the base id each one matches."""

    donor_ids: list[int]
    base_ids: list[int]


def choose_held_out(
    match: VocabularyMatch,
    holdout: float | None,
    seed: int,
    *,
    like: HoldoutLike = "random",
    donor_rows: torch.Tensor | None = None,
) -> HeldOut:
    """The anchors to hold out, drawn by base token (``like``: module docstring).

    Every anchor matching a drawn base token is held out, so that no base row of a held-out
    token stays among the anchors through a second donor token with the same bytes.
    ``like="new"`` needs the donor matrix (``donor_rows``) for its nearest anchors.
    """
    donor_ids, base_ids = match.anchors()
    distinct_base = sorted(set(base_ids))
    size = holdout_size(len(distinct_base), holdout, exact=True)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(distinct_base), generator=generator).tolist()
    if like == "new":
        if donor_rows is None:
            raise ValueError("like='new' needs the donor rows")
        votes = nearest_anchor_votes(match, donor_rows, seed)
        # Most-voted base tokens first; the random order breaks ties (and fills up).
        order.sort(key=lambda i: -votes.get(distinct_base[i], 0))
    held_base = {distinct_base[i] for i in order[:size]}
    pairs = [(d, b) for d, b in zip(donor_ids, base_ids, strict=True) if b in held_base]
    return HeldOut(donor_ids=[d for d, _ in pairs], base_ids=[b for _, b in pairs])


def nearest_anchor_votes(
    match: VocabularyMatch, donor_rows: torch.Tensor, seed: int
) -> dict[int, int]:
    """base id -> how many new tokens (up to ``VOTERS``, seeded) have it as nearest anchor."""
    donor_ids, base_ids = match.anchors()
    if not match.new_tokens:
        return {}
    device = donor_rows.device
    counts = nearest_anchor_counts(
        donor_rows[torch.tensor(match.new_tokens, device=device)],
        donor_rows[torch.tensor(donor_ids, device=device)],
        seed,
    )
    votes: dict[int, int] = {}
    for j in counts.nonzero().flatten().tolist():
        votes[base_ids[j]] = votes.get(base_ids[j], 0) + int(counts[j])
    return votes


def without_held_out(match: VocabularyMatch, held: HeldOut) -> VocabularyMatch:
    """The match with the held-out anchors turned into the only new tokens."""
    held_ids = set(held.donor_ids)
    matched = {d: pair for d, pair in match.matched.items() if d not in held_ids}
    return VocabularyMatch(
        matched=matched,
        new_tokens=list(held.donor_ids),
        junk_tokens=[],
        donor_rows=match.donor_rows,
    )


@dataclass(frozen=True)
class LeaveOutTask:
    """One matrix's held-out problem, the true base rows of its targets, and what a selector
    is given with it (the held-out match's pairs)."""

    matrix: str
    problem: ApproximationProblem
    truth: torch.Tensor
    anchors: int
    context: SelectionContext

    @property
    def held_out(self) -> int:
        return self.problem.num_targets


def leave_out_tasks(
    base: LoadedModel,
    donor: LoadedModel,
    *,
    options: TransplantOptions | None = None,
    holdout: float | None = None,
    seed: int = 0,
    like: HoldoutLike = "random",
    progress: bool = False,
) -> list[LeaveOutTask]:
    """The held-out problem of each matrix the transplant ``options`` plan, one seed for all.

    The matrices, their matches (policy, forced pairs) and the batch size are the plan's
    (``plan.plan_transplant``), as in ``mergekit-omp``."""
    options = options or TransplantOptions(base_model=base.path, donor=donor.path)
    plan = plan_transplant(options, base, donor)
    tasks = []
    for matrix in plan.matrices:
        base_rows, donor_rows = matrix.base_rows(base), matrix.donor_rows(donor)
        match = plan.match(matrix, base, donor)
        held = choose_held_out(match, holdout, seed, like=like, donor_rows=donor_rows)
        held_match = without_held_out(match, held)
        problem = build_problem(
            hidden_base_rows(base_rows, held.base_ids),
            donor_rows,
            held_match,
            base,
            donor,
            is_lm_head=matrix.name == "lm_head",
            batch_size=options.batch_size,
            progress=progress,
            seed=seed,
        )
        problem = dataclasses.replace(
            problem, base_vocab=vocabulary_without(base.vocabulary, held.base_ids)
        )
        truth = base_rows[torch.tensor(held.base_ids, device=base_rows.device)].to(
            problem.work_dtype
        )
        tasks.append(
            LeaveOutTask(
                matrix.name,
                problem,
                truth,
                anchors=len(problem.donor_anchor_ids),
                context=selection_context(held_match, base),
            )
        )
    return tasks


class MatrixScore(BaseModel):
    """How close one method's rows came to the held-out rows of one matrix."""

    mean_cosine: float
    relative_l2: float
    seconds: float


def relative_l2(rows: torch.Tensor, truth: torch.Tensor) -> float:
    """||approximated - true||_F / ||true||_F over the held-out rows (zero rows score 1)."""
    rows, truth = rows.double(), truth.double()
    return ((rows - truth).norm() / truth.norm().clamp_min(COSINE_EPS)).item()


def score_method(
    task: LeaveOutTask, method: Approximator, parameters: dict[str, Any]
) -> MatrixScore:
    """Run ``method`` on the held-out problem and compare with the true rows."""
    start = time.perf_counter()
    approximation = approximate_new_rows(task.problem, method, parameters, context=task.context)
    seconds = time.perf_counter() - start
    return MatrixScore(
        mean_cosine=mean_cosine(approximation.rows, task.truth),
        relative_l2=relative_l2(approximation.rows, task.truth),
        seconds=round(seconds, 4),
    )
