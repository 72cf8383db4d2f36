"""The one call: give a base model the donor's tokenizer.

    from mergekit_omp import TransplantOptions, transplant
    report = transplant(TransplantOptions(base_model="base", donor="donor"), "out")

Stages, each in its own module: load -> plan -> match -> approximate -> audit
(diagnostics/) -> assemble -> write -> report. ``plan.plan_transplant`` makes every
decision; ``match_matrix`` and ``build_matrix`` carry them out for one matrix.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mergekit.options import MergeOptions
from transformers import PreTrainedTokenizerBase

from mergekit_omp.approximate import approximate_new_rows, build_problem, selection_context
from mergekit_omp.approximators import Approximation, ApproximationProblem
from mergekit_omp.assemble import assemble_matrix, require_finite
from mergekit_omp.card import RECIPE_FILE, model_card, output_recipe
from mergekit_omp.checkpoint import ShardCopy
from mergekit_omp.diagnostics.records import BosRecord
from mergekit_omp.diagnostics.stage import MatrixDiagnosis, audit_matrix, check_numbers
from mergekit_omp.diagnostics.summary import tokenizer_differences
from mergekit_omp.kernels.calibrate import machine_rates
from mergekit_omp.kernels.omp import recorded_calls
from mergekit_omp.load import LoadedModel, load_pair
from mergekit_omp.match import VocabularyMatch
from mergekit_omp.options import Matrix, TransplantOptions
from mergekit_omp.plan import MatrixPlan, TransplantPlan, plan_transplant
from mergekit_omp.publish import check_output_path, staged_output
from mergekit_omp.report import MatrixReport, TransplantReport
from mergekit_omp.select.base import ChosenApproximation
from mergekit_omp.write import (
    copying_untouched_shards,
    donor_token_ids,
    write_config_and_tokenizer,
    write_weights,
)

LOG = logging.getLogger(__name__)


@dataclass
class MatrixResult:
    """One rebuilt vocabulary matrix and how it was made."""

    name: Matrix
    tensor_name: str
    match: VocabularyMatch
    approximation: Approximation
    matrix: torch.Tensor
    diagnosis: MatrixDiagnosis | None = None


@dataclass
class TransplantResult:
    report: TransplantReport
    matrices: dict[str, MatrixResult] = field(default_factory=dict)
    tokenizer: PreTrainedTokenizerBase | None = None
    """The output tokenizer: the donor's, with BOS insertion following the base."""
    plan: TransplantPlan | None = None


@dataclass
class MatrixProblem:
    """One vocabulary matrix matched, and its new tokens' problem built from the donor's
    rows: all ``build_matrix`` needs of the donor."""

    matrix: MatrixPlan
    match: VocabularyMatch
    problem: ApproximationProblem


def match_matrix(
    plan: TransplantPlan,
    matrix: MatrixPlan,
    base: LoadedModel,
    donor: LoadedModel,
    report: TransplantReport,
    *,
    progress: bool = True,
) -> MatrixProblem:
    """Match one vocabulary matrix as ``plan`` decided and gather its problem."""
    options = plan.options
    with report.timed("match"):
        match = plan.match(matrix, base, donor)
    LOG.info("%s: %s", matrix.name, match.counts())
    with report.timed("approximate"):
        problem = build_problem(
            matrix.base_rows(base),
            matrix.donor_rows(donor),
            match,
            base,
            donor,
            is_lm_head=matrix.name == "lm_head",
            batch_size=options.batch_size,
            progress=progress,
            seed=options.seed,
        )
    return MatrixProblem(matrix, match, problem)


def build_matrix(
    plan: TransplantPlan,
    matched: MatrixProblem,
    base: LoadedModel,
    report: TransplantReport,
    *,
    progress: bool = True,
) -> MatrixResult:
    """Approximate, audit and assemble one matched vocabulary matrix as ``plan`` decided."""
    options, matrix, match, problem = plan.options, matched.matrix, matched.match, matched.problem
    base_rows = matrix.base_rows(base)
    with report.timed("approximate"), recorded_calls() as omp_calls:
        approximation = approximate_new_rows(
            problem,
            matrix.method,
            matrix.parameters,
            context=selection_context(match, base),
            noise=options.new_vocab_noise,
            scale=options.new_vocab_scale,
        )
    if omp_calls:
        report.record_omp(matrix.name, omp_calls, machine_rates(problem.targets.device))
    chosen = approximation.choice if isinstance(approximation, ChosenApproximation) else None
    choice = report.choice_without_seconds(matrix.name, chosen)
    with report.timed("audit"):
        approximation, diagnosis = audit_matrix(
            problem,
            approximation,
            report,
            matrix=matrix.name,
            is_output=matrix.is_output,
            guard=options.guard,
            seed=options.seed,
            progress=progress,
        )
    with report.timed("assemble"):
        dtype = plan.dtype or base_rows.dtype
        new_matrix = assemble_matrix(base_rows, match, approximation.rows, plan.out_rows, dtype)
        # Matched rows are copies of base rows, finite when loaded: in the base's own dtype
        # only the new rows can be infinite.
        copies_exact = dtype == base_rows.dtype
        require_finite(new_matrix, matrix.name, list(match.new_tokens) if copies_exact else None)
    report.matrices.append(
        MatrixReport(
            matrix=matrix.name,
            tensor=matrix.tensor_name,
            method=matrix.method.name,
            parameters=dict(matrix.parameters),
            byte_match=matrix.policy.byte_match,
            prefix_match=matrix.policy.prefix_match,
            counts=match.counts(),
            anchors=len(problem.donor_anchor_ids),
            rows=plan.out_rows,
            choice=choice,
        )
    )
    return MatrixResult(
        matrix.name, matrix.tensor_name, match, approximation, new_matrix, diagnosis
    )


def build_matrices(
    plan: TransplantPlan,
    base: LoadedModel,
    donor: LoadedModel,
    report: TransplantReport,
    *,
    progress: bool = True,
    release_donor_matrices: bool = False,
) -> dict[str, MatrixResult]:
    """Every matrix of ``plan`` (``match_matrix``, then ``build_matrix``), then the
    number-scheme check. With ``release_donor_matrices`` the donor's loaded matrices are
    released (``LoadedModel.release_matrices``) once every problem is gathered: Gemma-3's
    262,144 x 640 float32 embedding is 0.67 GB that OMP would otherwise run beside."""
    record_plan(plan, report)
    matched = [
        match_matrix(plan, matrix, base, donor, report, progress=progress)
        for matrix in plan.matrices
    ]
    if release_donor_matrices:
        donor.release_matrices()
    results: dict[str, MatrixResult] = {}
    while matched:  # each problem is dropped once its matrix is built
        one = matched.pop(0)
        results[one.matrix.name] = build_matrix(plan, one, base, report, progress=progress)
        del one
    with report.timed("numbers"):
        check_numbers(base, donor, results["embed"].match, report)
    return results


def record_plan(plan: TransplantPlan, report: TransplantReport) -> None:
    """The plan's decisions in the report: BOS, output rows, its warnings."""
    report.tied_embeddings = plan.tied
    report.vocab_size = plan.out_rows
    report.diagnostics.bos = BosRecord.model_validate(plan.bos_diagnostics())
    if plan.multimodal is not None:
        report.diagnostics.multimodal_tokens = plan.multimodal.new_ids
    report.warnings.extend(plan.warnings)


def transplant(
    options: TransplantOptions,
    out_path: str | os.PathLike | None = None,
    *,
    merge_options: MergeOptions | None = None,
    overwrite: bool = False,
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
    card_recipe: str | None = None,
) -> TransplantResult:
    """Give ``options.base_model`` the tokenizer of ``options.donor``.

    With ``out_path`` the new model is written there (atomically); without it, only the new
    matrices and the report are returned. ``card_recipe`` is the recipe YAML written into the
    output and shown in its model card (default: the recipe of ``options``, local model
    paths made absolute).
    """
    merge_options = merge_options or MergeOptions()
    if out_path is not None:
        check_output_path(out_path, overwrite, inputs=(options.base_model, options.donor))
    report = TransplantReport(
        base_model=options.base_model,
        donor=options.donor,
        options=options.model_dump(mode="json"),
    )
    with report.timed("load"):
        base, donor = load_pair(options.base_model, options.donor, merge_options)
    with report.timed("plan"):
        plan = plan_transplant(options, base, donor)
    progress = progress and not merge_options.quiet
    if out_path is None:
        result = transplant_result(plan, base, donor, report, progress)
    else:
        recipe = card_recipe if card_recipe is not None else output_recipe(options)
        # The staging directory exists from here on, so that the base's shards without a
        # vocabulary tensor are copied into it while the matrices are computed.
        with staged_output(out_path, overwrite) as staging:
            with copying_untouched_shards(staging, base, merge_options) as copying:
                result = transplant_result(plan, base, donor, report, progress)
                # The old vocabulary matrices are used up; writing should not hold them.
                base, donor = base.without_matrices(), donor.without_matrices()
                write_transplant(
                    result, base, donor, staging, out_path, merge_options, recipe, copying
                )
            publishing = time.perf_counter()
        report.seconds["publish"] = round(time.perf_counter() - publishing, 3)
    if report_path is not None:
        report.write_json(report_path)
    return result


def transplant_result(
    plan: TransplantPlan,
    base: LoadedModel,
    donor: LoadedModel,
    report: TransplantReport,
    progress: bool,
) -> TransplantResult:
    matrices = build_matrices(
        plan, base, donor, report, progress=progress, release_donor_matrices=True
    )
    return TransplantResult(report=report, matrices=matrices, tokenizer=plan.tokenizer, plan=plan)


def aux_match(result: TransplantResult) -> VocabularyMatch:
    """The match that lays out per-token tensors besides the matrices (an LM-head bias):
    the LM head's when it has its own, else the embedding's."""
    matrix = result.matrices.get("lm_head") or result.matrices["embed"]
    return matrix.match


def write_transplant(
    result: TransplantResult,
    base: LoadedModel,
    donor: LoadedModel,
    staging: Path,
    out_path: str | os.PathLike,
    merge_options: MergeOptions,
    card_recipe: str | None = None,
    copying: ShardCopy | None = None,
) -> None:
    """The output model in ``staging``, to be published at ``out_path``. ``copying`` is the
    copy of the untouched shards under way (``write.copying_untouched_shards``): the write
    waits for it, and the report gives its own seconds as ``copy (overlapped)``."""
    report = result.report
    with report.timed("write"):
        replacements = {m.tensor_name: m.matrix for m in result.matrices.values()}
        write_weights(
            staging,
            base,
            replacements,
            aux_match(result),
            report.vocab_size,
            merge_options,
            copying,
        )
        if copying is not None:
            report.seconds["copy (overlapped)"] = round(copying.seconds, 3)
        write_config_and_tokenizer(
            staging,
            base,
            donor,
            report.vocab_size,
            donor_token_ids(donor),
            tokenizer=result.tokenizer,
            multimodal=result.plan.multimodal if result.plan is not None else None,
        )
        report.write_json(staging / "mergekit_omp_report.json")
        if card_recipe is not None:
            (staging / RECIPE_FILE).write_text(card_recipe, encoding="utf-8")
        if merge_options.write_model_card and card_recipe is not None:
            card = model_card(
                report,
                card_recipe,
                name=os.path.basename(os.path.abspath(out_path)),
                tokenizer_differences=tokenizer_differences(report.diagnostics),
            )
            (staging / "README.md").write_text(card, encoding="utf-8")
