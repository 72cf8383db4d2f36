"""The plan of a transplant: every decision, made once, before any row is computed.

``plan_transplant(options, base, donor)`` turns validated options and the two loaded
models into a frozen :class:`TransplantPlan`: the BOS outcome and the forced pairs it
implies, the output tokenizer and vocabulary, the output rows, and one
:class:`MatrixPlan` per vocabulary matrix (match policy, method, validated parameters).
``transplant.build_matrix`` builds one matrix from it. Every entry point (``mergekit-omp``,
``mergekit-omp-report``, leave-out validation, bits per byte) plans through here, so they
cannot build different rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.tokenizer.config import ModelTokenEmbedding
from mergekit.tokensurgeon import well_trained_tokens
from transformers import PreTrainedTokenizerBase

from mergekit_omp.approximators import Approximator
from mergekit_omp.assemble import output_vocab_size
from mergekit_omp.bos import BosPlan, output_tokenizer, plan_bos
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import LoadedModel
from mergekit_omp.match import MatchPolicy, VocabularyMatch, match_vocabularies
from mergekit_omp.multimodal import MultimodalTokens, plan_multimodal_tokens
from mergekit_omp.options import Matrix, TransplantOptions
from mergekit_omp.vocabulary import Vocabulary


@dataclass(frozen=True)
class ForcedPair:
    """A donor token that takes a given base row, before (and instead of) matching.

    ``reason`` says why: ``bos`` (the output inserts the donor's BOS where the base expects
    its own), ``tokens`` (the recipe's ``tokens:`` names the base token) or ``multimodal`` (a
    multimodal base's image/video/audio token, added to the output tokenizer). A pair whose
    base id has no base row is ignored by matching."""

    donor_id: int
    base_id: int
    reason: str


@dataclass(frozen=True)
class MatrixPlan:
    """How one vocabulary matrix of the output is made."""

    name: Matrix
    tensor_name: str
    """The base's tensor this matrix replaces."""
    policy: MatchPolicy
    method: Approximator
    parameters: dict[str, Any]
    """``method``'s parameters, validated and defaulted (do not mutate)."""
    is_output: bool
    """Whether the matrix scores tokens (LM head, or a tied embedding): the audit's salience."""
    forced_pairs: tuple[ForcedPair, ...] = ()
    """Pairs for this matrix only, on top of ``TransplantPlan.forced_pairs``."""

    def base_rows(self, base: LoadedModel) -> torch.Tensor:
        rows = base.embed if self.name == "embed" else base.lm_head
        assert rows is not None, f"the base has no {self.name} matrix"
        return rows

    def donor_rows(self, donor: LoadedModel) -> torch.Tensor:
        if self.name == "lm_head" and donor.lm_head is not None:
            return donor.lm_head
        assert donor.embed is not None, "the donor's embedding was released"
        return donor.embed


@dataclass(frozen=True)
class TransplantPlan:
    """Every decision of one transplant; ``transplant.build_matrix`` carries them out."""

    options: TransplantOptions
    bos: BosPlan
    """BOS insertion of base, donor and output (``output_adds_bos`` as the tokenizer does)."""
    tokenizer: PreTrainedTokenizerBase
    """The output tokenizer: the donor's, inserting BOS as ``bos`` says."""
    vocabulary: Vocabulary
    """The output tokenizer's vocabulary: the donor ids every matrix is laid out in."""
    forced_pairs: tuple[ForcedPair, ...]
    """Pairs every matrix takes before matching (donor id -> base id)."""
    matrices: tuple[MatrixPlan, ...]
    out_rows: int
    """Rows of every output vocabulary matrix (donor rows, padded as asked)."""
    well_trained: tuple[frozenset[int], frozenset[int]] | None = None
    """``--magikarp``: (donor ids, base ids) of well-trained tokens; None without it."""
    warnings: tuple[str, ...] = ()
    dtype: torch.dtype | None = None
    """Dtype of the new matrices; None keeps each base matrix's."""
    tied: bool = False
    """The base ties its LM head to its embeddings (the output stays tied)."""
    multimodal: MultimodalTokens | None = None
    """A multimodal base's special tokens, added to the output tokenizer (multimodal.py)."""

    def matrix(self, name: Matrix) -> MatrixPlan:
        return next(m for m in self.matrices if m.name == name)

    def pairs_for(self, matrix: MatrixPlan) -> dict[int, int]:
        """donor id -> base id forced for ``matrix``: the plan's pairs, then the matrix's;
        for a donor id listed twice the later pair wins."""
        return {p.donor_id: p.base_id for p in (*self.forced_pairs, *matrix.forced_pairs)}

    def match(self, matrix: MatrixPlan, base: LoadedModel, donor: LoadedModel) -> VocabularyMatch:
        """Pair every output token with a base row for ``matrix`` (the match stage)."""
        return match_vocabularies(
            self.vocabulary,
            base.vocabulary,
            matrix.policy,
            donor_rows=matrix.donor_rows(donor).shape[0],
            base_rows=matrix.base_rows(base).shape[0],
            well_trained=self.well_trained,
            forced_pairs=self.pairs_for(matrix),
        )

    def bos_diagnostics(self) -> dict[str, bool]:
        return {
            "base_adds_bos": self.bos.base_adds_bos,
            "donor_adds_bos": self.bos.donor_adds_bos,
            "output_adds_bos": self.bos.output_adds_bos,
        }


def output_matrices(base: LoadedModel) -> list[tuple[Matrix, str]]:
    """(matrix, base tensor name) of each vocabulary matrix the output needs."""
    names: list[tuple[Matrix, str]] = [("embed", base.embed_info.name)]
    if base.lm_head is not None and base.lm_head_info is not None:
        names.append(("lm_head", base.lm_head_info.name))
    return names


def plan_bos_outcome(
    base: LoadedModel, donor: LoadedModel, options: TransplantOptions
) -> tuple[BosPlan, PreTrainedTokenizerBase, tuple[ForcedPair, ...], tuple[str, ...]]:
    """The BOS plan as the output tokenizer carries it out, and the pair it forces."""
    bos = plan_bos(base.tokenizer, donor.tokenizer, options.bos)
    tokenizer, failure = output_tokenizer(donor.tokenizer, bos)
    if failure is not None:
        bos = BosPlan(bos.base_adds_bos, bos.donor_adds_bos, bos.donor_adds_bos, bos.warning)
    warnings = tuple(w for w in (bos.warning, failure) if w)
    donor_bos, base_bos = donor.tokenizer.bos_token_id, base.tokenizer.bos_token_id
    pairs: tuple[ForcedPair, ...] = ()
    if bos.output_adds_bos and donor_bos is not None and base_bos is not None:
        pairs = (ForcedPair(donor_bos, base_bos, "bos"),)
    return bos, tokenizer, pairs, warnings


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of ``token`` as the tokenizer's vocabulary writes it (added tokens included)."""
    return tokenizer.get_vocab().get(token)


def names_donor(reference: ModelReference, options: TransplantOptions) -> bool:
    path = reference.model.path
    if path == options.donor:
        return True
    return (
        os.path.exists(path)
        and os.path.exists(options.donor)
        and os.path.samefile(path, options.donor)
    )


def token_override_pairs(
    options: TransplantOptions, base: LoadedModel, rows: int, donor: LoadedModel
) -> tuple[ForcedPair, ...]:
    """``tokens:`` as forced pairs: each donor token takes the named base token's row."""
    pairs = []
    for token, entry in (options.tokens or {}).items():
        donor_id = token_id(donor.tokenizer, token)
        if donor_id is None:
            raise TransplantError(f"tokens: '{token}' is not a token of the donor {options.donor}")
        source = entry.source
        model = source.model if isinstance(source, ModelTokenEmbedding) else source
        if names_donor(model, options):
            raise TransplantError(
                f"tokens.{token}.source: {model} is the donor; a transplant takes rows from the "
                f"base {options.base_model}"
            )
        if isinstance(source, ModelTokenEmbedding) and source.token_id is not None:
            base_id, name = source.token_id, f"id {source.token_id}"
        else:
            name = source.token if isinstance(source, ModelTokenEmbedding) else token
            base_id = token_id(base.tokenizer, name)
        if base_id is None or not 0 <= base_id < rows:
            raise TransplantError(
                f"tokens.{token}.source: '{name}' is not a token with a row in the base "
                f"{options.base_model}"
            )
        pairs.append(ForcedPair(donor_id, base_id, "tokens"))
    return tuple(pairs)


def well_trained_ids(
    vocab: Vocabulary, embed: torch.Tensor, lm_head: torch.Tensor | None
) -> frozenset[int]:
    """Ids mergekit's magikarp heuristic finds well trained."""
    by_string = {s: i for i, s in vocab.strings.items() if i < embed.shape[0]}
    good = well_trained_tokens(
        by_string, embed.float(), None if lm_head is None else lm_head.float()
    )
    return frozenset(by_string[t] for t in good)


def plan_matrix(
    options: TransplantOptions,
    name: Matrix,
    tensor_name: str,
    base: LoadedModel,
    donor: LoadedModel,
) -> MatrixPlan:
    """Policy, method and parameters of one matrix (options validated them already).

    ``donor`` is unused today: it is here for choices that look at the models."""
    method, parameters = options.method_and_parameters(name)
    return MatrixPlan(
        name=name,
        tensor_name=tensor_name,
        policy=options.match_policy(name),
        method=method,
        parameters=parameters,
        is_output=name == "lm_head" or base.tied,
    )


def plan_transplant(
    options: TransplantOptions, base: LoadedModel, donor: LoadedModel
) -> TransplantPlan:
    """Every decision of giving ``base`` the tokenizer of ``donor`` as ``options`` say."""
    output_donor, multimodal = plan_multimodal_tokens(base, donor)
    bos, tokenizer, pairs, warnings = plan_bos_outcome(base, output_donor, options)
    # the output tokenizer's: the donor's plus any multimodal tokens (BOS adds no token)
    vocabulary = output_donor.vocabulary
    if multimodal is not None:
        pairs += tuple(
            ForcedPair(new_id, base_id, "multimodal")
            for new_id, base_id in multimodal.forced_pairs.items()
        )
    if base.embed is None or donor.embed is None:
        raise ValueError("the models' vocabulary matrices were released (without_matrices)")
    pairs += token_override_pairs(options, base, base.embed.shape[0], donor)  # after BOS: wins
    well_trained = None
    if options.magikarp:
        well_trained = (
            well_trained_ids(donor.vocabulary, donor.embed, donor.lm_head),
            well_trained_ids(base.vocabulary, base.embed, base.lm_head),
        )
    return TransplantPlan(
        options=options,
        bos=bos,
        tokenizer=tokenizer,
        vocabulary=vocabulary,
        forced_pairs=pairs,
        matrices=tuple(
            plan_matrix(options, name, tensor, base, donor)
            for name, tensor in output_matrices(base)
        ),
        out_rows=output_vocab_size(
            donor.embed.shape[0], vocabulary.max_id, options.pad_vocab_to_multiple_of
        ),
        well_trained=well_trained,
        warnings=warnings,
        dtype=getattr(torch, options.dtype) if options.dtype else None,
        tied=base.tied,
        multimodal=multimodal,
    )


def with_matrix(plan: TransplantPlan, matrix: MatrixPlan, **changes: Any) -> TransplantPlan:
    """``plan`` with one matrix's plan changed (e.g. its method): plans are frozen."""
    updated = replace(matrix, **changes)
    return replace(
        plan, matrices=tuple(updated if m.name == matrix.name else m for m in plan.matrices)
    )


__all__ = [
    "ForcedPair",
    "MatrixPlan",
    "TransplantPlan",
    "output_matrices",
    "plan_transplant",
    "with_matrix",
]
