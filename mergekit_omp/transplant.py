"""The one call: give a base model the donor's tokenizer.

    from mergekit_omp import TransplantOptions, transplant
    report = transplant(TransplantOptions(base_model="base", donor="donor"), "out")

Stages, each in its own module: load -> match -> approximate -> audit (diagnostics/) ->
assemble -> write -> report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from mergekit.tokensurgeon import well_trained_tokens
from transformers import PreTrainedTokenizerBase

from mergekit_omp.approximate import approximate_new_rows, build_problem
from mergekit_omp.approximators import Approximation, get_approximator
from mergekit_omp.assemble import assemble_matrix, output_vocab_size
from mergekit_omp.bos import BosPolicy, output_tokenizer, plan_bos
from mergekit_omp.card import model_card
from mergekit_omp.diagnostics.stage import MatrixDiagnosis, audit_matrix, check_numbers
from mergekit_omp.load import LoadedModel, load_model
from mergekit_omp.match import VocabularyMatch, match_vocabularies
from mergekit_omp.options import Matrix, TransplantOptions
from mergekit_omp.recipe import recipe_yaml
from mergekit_omp.report import MatrixReport, TransplantReport
from mergekit_omp.vocabulary import Vocabulary
from mergekit_omp.write import (
    check_output_path,
    donor_token_ids,
    staged_output,
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


def bos_pair(base: LoadedModel, donor: LoadedModel) -> dict[int, int] | None:
    """The donor's BOS token carries the base's BOS row."""
    donor_bos, base_bos = donor.tokenizer.bos_token_id, base.tokenizer.bos_token_id
    if donor_bos is None or base_bos is None:
        return None
    return {donor_bos: base_bos}


def plan_output_tokenizer(
    base: LoadedModel, donor: LoadedModel, policy: BosPolicy, report: TransplantReport
) -> PreTrainedTokenizerBase:
    plan = plan_bos(base.tokenizer, donor.tokenizer, policy)
    tokenizer, failure = output_tokenizer(donor.tokenizer, plan)
    report.diagnostics["bos"] = {
        "base_adds_bos": plan.base_adds_bos,
        "donor_adds_bos": plan.donor_adds_bos,
        "output_adds_bos": plan.output_adds_bos and failure is None,
    }
    report.warnings.extend(w for w in (plan.warning, failure) if w)
    return tokenizer


def _well_trained_ids(
    vocab: Vocabulary, embed: torch.Tensor, lm_head: torch.Tensor | None
) -> set[int]:
    by_string = {s: i for i, s in vocab.strings.items() if i < embed.shape[0]}
    good = well_trained_tokens(
        by_string, embed.float(), None if lm_head is None else lm_head.float()
    )
    return {by_string[t] for t in good}


def _matrices_to_build(
    base: LoadedModel, donor: LoadedModel
) -> list[tuple[Matrix, torch.Tensor, torch.Tensor, str]]:
    """(matrix, base rows, donor rows, tensor name) for each matrix the output needs."""
    plans: list[tuple[Matrix, torch.Tensor, torch.Tensor, str]] = [
        ("embed", base.embed, donor.embed, base.embed_info.name)
    ]
    if base.lm_head is not None and base.lm_head_info is not None:
        donor_lm_head = donor.lm_head if donor.lm_head is not None else donor.embed
        plans.append(("lm_head", base.lm_head, donor_lm_head, base.lm_head_info.name))
    return plans


def build_matrices(
    base: LoadedModel,
    donor: LoadedModel,
    options: TransplantOptions,
    report: TransplantReport,
    *,
    progress: bool = True,
    forced_pairs: dict[int, int] | None = None,
) -> dict[str, MatrixResult]:
    """Match, approximate and assemble each vocabulary matrix of the output.

    ``forced_pairs`` (donor id -> base id) take precedence over matching, e.g. the donor's
    BOS token when the output tokenizer now inserts it for a base that expects its own.
    """
    well_trained = None
    if options.magikarp:
        with report.timed("magikarp"):
            well_trained = (
                _well_trained_ids(donor.vocabulary, donor.embed, donor.lm_head),
                _well_trained_ids(base.vocabulary, base.embed, base.lm_head),
            )
    out_rows = output_vocab_size(
        donor.embed.shape[0], donor.vocabulary.max_id, options.pad_vocab_to_multiple_of
    )
    report.vocab_size = out_rows
    results: dict[str, MatrixResult] = {}
    for matrix, base_rows, donor_rows, tensor_name in _matrices_to_build(base, donor):
        policy = options.match_policy(matrix)
        method = get_approximator(options.method_for(matrix))
        parameters = method.validate_parameters(options.parameters_for(matrix))
        with report.timed("match"):
            match = match_vocabularies(
                donor.vocabulary,
                base.vocabulary,
                policy,
                donor_rows=donor_rows.shape[0],
                base_rows=base_rows.shape[0],
                well_trained=well_trained,
                forced_pairs=forced_pairs,
            )
        LOG.info("%s: %s", matrix, match.counts())
        with report.timed("approximate"):
            problem = build_problem(
                base_rows,
                donor_rows,
                match,
                base,
                donor,
                is_lm_head=matrix == "lm_head",
                batch_size=options.batch_size,
                progress=progress,
                seed=options.seed,
            )
            approximation = approximate_new_rows(
                problem,
                method,
                parameters,
                noise=options.new_vocab_noise,
                scale=options.new_vocab_scale,
            )
        with report.timed("audit"):
            approximation, diagnosis = audit_matrix(
                problem,
                approximation,
                report,
                matrix=matrix,
                is_output=matrix == "lm_head" or base.tied,
                guard=options.guard,
                seed=options.seed,
                progress=progress,
            )
        with report.timed("assemble"):
            dtype = getattr(torch, options.dtype) if options.dtype else base_rows.dtype
            new_matrix = assemble_matrix(base_rows, match, approximation.rows, out_rows, dtype)
        results[matrix] = MatrixResult(
            matrix, tensor_name, match, approximation, new_matrix, diagnosis
        )
        report.matrices.append(
            MatrixReport(
                matrix=matrix,
                tensor=tensor_name,
                method=method.name,
                parameters=parameters,
                byte_match=policy.byte_match,
                prefix_match=policy.prefix_match,
                counts=match.counts(),
                anchors=len(problem.donor_anchor_ids),
                rows=out_rows,
            )
        )
    with report.timed("numbers"):
        check_numbers(base, donor, results["embed"].match, report)
    return results


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
    matrices and the report are returned. ``card_recipe`` is the recipe YAML shown in the
    output's model card (default: the recipe of ``options``).
    """
    merge_options = merge_options or MergeOptions()
    if out_path is not None:
        check_output_path(out_path, overwrite)
    LoaderCache().setup(merge_options)
    report = TransplantReport(
        base_model=options.base_model,
        donor=options.donor,
        options=options.model_dump(mode="json"),
    )
    with report.timed("load"):
        base = load_model(options.base_model, merge_options, lm_head_falls_back_to_embed=False)
        donor = load_model(options.donor, merge_options, lm_head_falls_back_to_embed=True)
    report.tied_embeddings = base.tied
    tokenizer = plan_output_tokenizer(base, donor, options.bos, report)
    forced_pairs = bos_pair(base, donor) if report.diagnostics["bos"]["output_adds_bos"] else None
    matrices = build_matrices(
        base,
        donor,
        options,
        report,
        progress=progress and not merge_options.quiet,
        forced_pairs=forced_pairs,
    )
    result = TransplantResult(report=report, matrices=matrices, tokenizer=tokenizer)
    # The old vocabulary matrices are used up; writing should not hold them as well.
    base, donor = base.without_matrices(), donor.without_matrices()
    if out_path is not None:
        card = card_recipe if card_recipe is not None else recipe_yaml(options)
        write_transplant(result, base, donor, out_path, merge_options, overwrite, card)
    if report_path is not None:
        report.write_json(report_path)
    return result


def write_transplant(
    result: TransplantResult,
    base: LoadedModel,
    donor: LoadedModel,
    out_path: str | os.PathLike,
    merge_options: MergeOptions,
    overwrite: bool,
    card_recipe: str | None = None,
) -> None:
    report = result.report
    with report.timed("write"), staged_output(out_path, overwrite) as staging:
        replacements = {m.tensor_name: m.matrix for m in result.matrices.values()}
        write_weights(
            staging,
            base,
            replacements,
            result.matrices["embed"].match,
            report.vocab_size,
            merge_options,
        )
        write_config_and_tokenizer(
            staging,
            base,
            donor,
            report.vocab_size,
            donor_token_ids(donor),
            tokenizer=result.tokenizer,
        )
        report.write_json(staging / "mergekit_omp_report.json")
        if merge_options.write_model_card and card_recipe is not None:
            card = model_card(report, card_recipe, name=os.path.basename(os.path.abspath(out_path)))
            (staging / "README.md").write_text(card, encoding="utf-8")
