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
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from mergekit_omp.approximate import approximate_new_rows, build_problem
from mergekit_omp.approximators import ApproximationProblem, Approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import LoadedModel
from mergekit_omp.match import VocabularyMatch
from mergekit_omp.options import TransplantOptions
from mergekit_omp.plan import plan_transplant
from mergekit_omp.vocabulary import Vocabulary

DEFAULT_HOLDOUT_COUNT = 1000
DEFAULT_HOLDOUT_FRACTION = 0.05
COSINE_EPS = 1e-12
VOTERS = 8192
"""New tokens (a seeded sample, if there are more) whose nearest anchors ``like="new"`` counts."""
VOTE_BATCH = 1024
HoldoutLike = Literal["random", "new"]


def holdout_size(anchors: int, holdout: float | None, *, exact: bool = False) -> int:
    """How many anchors to hold out: a count (>= 1), a fraction (< 1), or by default the
    smaller of 1,000 and 5% of the anchors. At least one anchor is always kept: a count
    that leaves none is cut to fit, or refused if ``exact`` (``mergekit-omp-eval``)."""
    if anchors < 2:
        raise TransplantError(
            f"leave-out validation needs at least 2 shared tokens, found {anchors}"
        )
    if holdout is None:
        size = min(DEFAULT_HOLDOUT_COUNT, math.ceil(DEFAULT_HOLDOUT_FRACTION * anchors))
    elif 0 < holdout < 1:
        size = math.ceil(holdout * anchors)
    elif holdout >= 1 and float(holdout).is_integer():
        size = int(holdout)
        if exact and size >= anchors:
            raise TransplantError(
                f"--holdout {size} is not fewer than the {anchors} shared tokens: give a "
                f"count of at most {anchors - 1}, or a fraction"
            )
    else:
        raise TransplantError(
            f"--holdout must be a whole number of tokens or a fraction in (0, 1), got {holdout}"
        )
    return max(1, min(size, anchors - 1))


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


def nearest_anchor_counts(
    new_rows: torch.Tensor, anchor_rows: torch.Tensor, seed: int
) -> torch.Tensor:
    """For each anchor row, how many of ``new_rows`` (up to ``VOTERS``, a seeded sample)
    have it as their nearest anchor by cosine."""
    if new_rows.shape[0] > VOTERS:
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(new_rows.shape[0], generator=generator)[:VOTERS].sort().values
        new_rows = new_rows[picked.to(new_rows.device)]
    anchors = F.normalize(anchor_rows.float(), dim=1)
    counts = torch.zeros(anchor_rows.shape[0], dtype=torch.long, device=anchor_rows.device)
    for start in range(0, new_rows.shape[0], VOTE_BATCH):
        batch = F.normalize(new_rows[start : start + VOTE_BATCH].float(), dim=1)
        nearest = (batch @ anchors.T).argmax(dim=1)
        counts += torch.bincount(nearest, minlength=anchor_rows.shape[0])
    return counts


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


def hidden_base_rows(base_matrix: torch.Tensor, base_ids: list[int]) -> torch.Tensor:
    """The base matrix with the held-out rows replaced by the mean of the other rows."""
    hidden = torch.zeros(base_matrix.shape[0], dtype=torch.bool, device=base_matrix.device)
    hidden[base_ids] = True
    masked = base_matrix.clone()
    masked[hidden] = base_matrix[~hidden].mean(dim=0).to(base_matrix.dtype)
    return masked


def vocabulary_without(vocab: Vocabulary, token_ids: list[int]) -> Vocabulary:
    removed = set(token_ids)
    return dataclasses.replace(
        vocab,
        forms={i: f for i, f in vocab.forms.items() if i not in removed},
        strings={i: s for i, s in vocab.strings.items() if i not in removed},
    )


@dataclass(frozen=True)
class LeaveOutTask:
    """One matrix's held-out problem and the true base rows of its targets."""

    matrix: str
    problem: ApproximationProblem
    truth: torch.Tensor
    anchors: int

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
        problem = build_problem(
            hidden_base_rows(base_rows, held.base_ids),
            donor_rows,
            without_held_out(match, held),
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
            LeaveOutTask(matrix.name, problem, truth, anchors=len(problem.donor_anchor_ids))
        )
    return tasks


class MatrixScore(BaseModel):
    """How close one method's rows came to the held-out rows of one matrix."""

    mean_cosine: float
    relative_l2: float
    seconds: float


def mean_cosine(rows: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over tokens of cos(approximated row, true row); a zero row scores 0."""
    return F.cosine_similarity(rows.double(), truth.double(), dim=1, eps=COSINE_EPS).mean().item()


def relative_l2(rows: torch.Tensor, truth: torch.Tensor) -> float:
    """||approximated - true||_F / ||true||_F over the held-out rows (zero rows score 1)."""
    rows, truth = rows.double(), truth.double()
    return ((rows - truth).norm() / truth.norm().clamp_min(COSINE_EPS)).item()


def score_method(
    task: LeaveOutTask, method: Approximator, parameters: dict[str, Any]
) -> MatrixScore:
    """Run ``method`` on the held-out problem and compare with the true rows."""
    start = time.perf_counter()
    approximation = approximate_new_rows(task.problem, method, parameters)
    seconds = time.perf_counter() - start
    return MatrixScore(
        mean_cosine=mean_cosine(approximation.rows, task.truth),
        relative_l2=relative_l2(approximation.rows, task.truth),
        seconds=round(seconds, 4),
    )
