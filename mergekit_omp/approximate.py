"""Approximate stage: base rows for the donor tokens no base token matches."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergekit_omp.approximators import Approximation, ApproximationProblem, Approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import LoadedModel
from mergekit_omp.match import VocabularyMatch
from mergekit_omp.select.base import SelectionContext, Selector
from mergekit_omp.vocabulary import Vocabulary


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class ProblemSide:
    """One model's side of an approximation problem: its vocabulary matrix and what
    describes its ids."""

    name: str
    matrix: torch.Tensor
    vocabulary: Vocabulary
    tokenizer: PreTrainedTokenizerBase | None = None
    config: PretrainedConfig | None = None
    rows: Mapping[int, int] | None = None
    """The matrix row of each id where ids are not rows (a merge's output ids)."""

    @classmethod
    def of(cls, model: LoadedModel, matrix: torch.Tensor) -> ProblemSide:
        return cls(model.path, matrix, model.vocabulary, model.tokenizer, model.config)

    def gather(self, ids: list[int]) -> torch.Tensor:
        """The matrix rows of ``ids``, in the matrix's dtype."""
        rows = ids if self.rows is None else [self.rows[i] for i in ids]
        return self.matrix[torch.tensor(rows, dtype=torch.long, device=self.matrix.device)]


def make_problem(
    base: ProblemSide,
    donor: ProblemSide,
    target_ids: list[int],
    anchors: tuple[list[int], list[int]],
    *,
    is_lm_head: bool,
    batch_size: int | None,
    progress: bool,
    seed: int,
) -> ApproximationProblem:
    """The problem of approximating the donor's ``target_ids`` from ``anchors`` (donor ids,
    base ids): the one builder, for transplants (``build_problem``) and merges."""
    donor_ids, base_ids = anchors
    if not donor_ids:
        raise TransplantError(
            f"{base.name} and {donor.name} share no tokens: nothing to anchor an approximation on"
        )
    dtype = work_dtype(base.matrix, donor.matrix)
    return ApproximationProblem(
        targets=donor.gather(target_ids).to(dtype),
        donor_anchors=donor.gather(donor_ids).to(dtype),
        base_anchors=base.gather(base_ids),
        base_matrix=base.matrix,
        target_ids=list(target_ids),
        donor_anchor_ids=list(donor_ids),
        base_anchor_ids=list(base_ids),
        donor_vocab=donor.vocabulary,
        base_vocab=base.vocabulary,
        donor_tokenizer=donor.tokenizer,
        base_tokenizer=base.tokenizer,
        is_lm_head=is_lm_head,
        batch_size=batch_size if batch_size and batch_size > 0 else None,
        progress=progress,
        seed=seed,
        base_config=base.config,
        donor_config=donor.config,
    )


def build_problem(
    base_matrix: torch.Tensor,
    donor_matrix: torch.Tensor,
    match: VocabularyMatch,
    base: LoadedModel,
    donor: LoadedModel,
    *,
    is_lm_head: bool,
    batch_size: int | None,
    progress: bool,
    seed: int,
) -> ApproximationProblem:
    """A transplant's problem: the match's new tokens from its anchors."""
    return make_problem(
        ProblemSide.of(base, base_matrix),
        ProblemSide.of(donor, donor_matrix),
        list(match.new_tokens),
        match.anchors(),
        is_lm_head=is_lm_head,
        batch_size=batch_size,
        progress=progress,
        seed=seed,
    )


def selection_context(match: VocabularyMatch, base: LoadedModel) -> SelectionContext:
    """What a selector (``auto``) needs beyond the problem: the base model to run, and every
    matched pair (the rows ``assemble_matrix`` copies from the base)."""
    return SelectionContext(
        base_path=base.path,
        matched_ids=(list(match.matched), [b for b, _ in match.matched.values()]),
    )


def approximate_new_rows(
    problem: ApproximationProblem,
    method: Approximator,
    parameters: dict[str, Any],
    *,
    context: SelectionContext | None = None,
    noise: float | None = None,
    scale: float | None = None,
) -> Approximation:
    """Run ``method`` on ``problem`` (a selector with ``context``) and apply mergekit's
    ``-nvn``/``-nvs`` post-processing."""
    if problem.num_targets == 0:
        empty = problem.new_rows(0)
        return Approximation(rows=empty)
    if isinstance(method, Selector):
        result = method(problem, context, **parameters)
    else:
        result = method(problem, **parameters)
    rows = result.rows.to(problem.work_dtype)
    if rows.shape != (problem.num_targets, problem.base_dim):
        raise TransplantError(
            f"method '{method.name}' returned rows of shape {tuple(rows.shape)}, "
            f"expected {(problem.num_targets, problem.base_dim)}"
        )
    if noise:
        generator = torch.Generator(device="cpu").manual_seed(problem.seed)
        rows = rows + noise * torch.randn(rows.shape, generator=generator, dtype=rows.dtype).to(
            rows.device
        )
    if scale:
        rows = rows * scale
    return dataclasses.replace(result, rows=rows)  # keeps a method's extra fields
