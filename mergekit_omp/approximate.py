"""Approximate stage: base rows for the donor tokens no base token matches."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mergekit_omp.approximators import Approximation, ApproximationProblem, Approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import LoadedModel
from mergekit_omp.match import VocabularyMatch
from mergekit_omp.select.base import SelectionContext, Selector


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
    donor_ids, base_ids = match.anchors()
    if not donor_ids:
        raise TransplantError(
            f"{base.path} and {donor.path} share no tokens: nothing to anchor an approximation on"
        )
    dtype = work_dtype(base_matrix, donor_matrix)
    targets = torch.tensor(match.new_tokens, dtype=torch.long, device=donor_matrix.device)
    return ApproximationProblem(
        targets=donor_matrix[targets].to(dtype),
        donor_anchors=donor_matrix[torch.tensor(donor_ids, device=donor_matrix.device)].to(dtype),
        base_anchors=base_matrix[torch.tensor(base_ids, device=base_matrix.device)],
        base_matrix=base_matrix,
        target_ids=list(match.new_tokens),
        donor_anchor_ids=donor_ids,
        base_anchor_ids=base_ids,
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
