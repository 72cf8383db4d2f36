"""One more token-embedding source for mergekit's merges: the OMP approximation.

In a merge with a merged vocabulary (``tokenizer: {source: union}``, or a model as source)
mergekit's ``PermutedVocabulary`` gives a model that lacks a token another model's row for it
(copied, or averaged over the models that have it): a row from a different embedding space.
``OmpPermutedVocabulary`` runs mergekit's ``PermutedVocabulary`` unchanged, then overwrites
those rows with the lacking model's own approximation, made as a transplant makes one: the
lacking model is the base, the model that has the token (the *source*) the donor, the tokens
both models share the anchors. ``omp`` (per-token ``{kind: omp}`` sources, and
``method: omp``) writes the source's row as a sparse combination of the anchors and applies
the same coefficients to the lacking model's anchor rows (``omp_rows``); any other method
(``auto``, the default of ``missing_tokens: omp``) runs on an ``ApproximationProblem`` built
from the two models and the merge's output tokenizer (``fill_problem``).

mergekit decides which tokens a model has (its permutations); only the rows it would fill
from another model are replaced. The merge itself stays mergekit's: ``omp_token_rows()``
makes mergekit's planner build this task instead of ``PermutedVocabulary`` for the duration
of one ``run_merge``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import mergekit.plan
import torch
from mergekit.common import ImmutableMap, ModelReference
from mergekit.options import MergeOptions
from mergekit.tokenizer import PermutedVocabulary, TokenizerInfo
from mergekit.vocabulary import vocabulary_views
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergekit_omp.approximate import ProblemSide, approximate_new_rows, make_problem, work_dtype
from mergekit_omp.approximators import get_approximator
from mergekit_omp.approximators.base import (
    DEFAULT_BATCH_SIZE,
    ApproximationProblem,
    combine_anchor_rows,
)
from mergekit_omp.approximators.omp import DEFAULT_K
from mergekit_omp.checkpoint import Checkpoint
from mergekit_omp.errors import TransplantError
from mergekit_omp.kernels.omp import batch_omp
from mergekit_omp.load import load_tokenizer
from mergekit_omp.locate import vocabulary_tensors
from mergekit_omp.merge.config import OmpMergeSettings, OmpTokenSource
from mergekit_omp.select.base import Choice, ChosenApproximation, SelectionContext
from mergekit_omp.vocabulary import Vocabulary, vocabulary_of

LOG = logging.getLogger(__name__)

Permutation = dict[int, int]


@dataclass(frozen=True)
class OmpFill:
    """Rows of one tensor of one model that mergekit-omp made, and how."""

    tensor: str
    model: str
    source: str
    tokens: int
    k: int | None
    """OMP's k (``omp``), the k the method took, or None for a method without one."""
    anchors: int
    method: str = "omp"
    parameters: dict[str, Any] | None = None
    """The method's parameters, defaults filled in."""
    choice: Choice | None = None
    """``auto``: the candidates, their validation scores and the one chosen
    (``ChosenApproximation.choice``)."""


@dataclass(frozen=True)
class _Fill:
    model: ModelReference
    source: ModelReference
    method: str
    k: int | None


class _FillLog:
    """Where the tasks of the running merge record their OMP rows (for the summary and card)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[OmpFill] | None = None

    def record(self, fill: OmpFill) -> None:
        with self._lock:
            if self._active is not None:
                self._active.append(fill)

    @contextlib.contextmanager
    def collecting(self) -> Iterator[list[OmpFill]]:
        fills: list[OmpFill] = []
        with self._lock:
            self._active = fills
        try:
            yield fills
        finally:
            with self._lock:
                self._active = None


FILL_LOG = _FillLog()


def _frozen(value: Any) -> Any:
    """``value`` hashable, as the values of a mergekit task's fields must be."""
    if isinstance(value, dict):
        return tuple((key, _frozen(item)) for key, item in value.items())
    if isinstance(value, list | tuple):
        return tuple(_frozen(item) for item in value)
    return value


def _has(permutation: Permutation, token_id: int) -> bool:
    return permutation.get(token_id, -1) >= 0


def shared_token_ids(first: Permutation, second: Permutation, vocab_size: int) -> list[int]:
    """Output-vocabulary ids both models have: the anchors between them."""
    return [i for i in range(vocab_size) if _has(first, i) and _has(second, i)]


def omp_rows(
    source_rows: torch.Tensor,
    model_rows: torch.Tensor,
    source_permutation: Permutation,
    model_permutation: Permutation,
    token_ids: list[int],
    anchor_ids: list[int],
    k: int,
) -> torch.Tensor:
    """The model's rows for ``token_ids``, which only the source has.

    OMP writes each source row as a k-sparse combination of the source's anchor rows; the
    same coefficients applied to the model's anchor rows give the model's row.
    """
    dtype = work_dtype(source_rows, model_rows)
    source_anchors = source_rows[[source_permutation[i] for i in anchor_ids]].to(dtype)
    model_anchors = model_rows[[model_permutation[i] for i in anchor_ids]].to(dtype)
    targets = source_rows[[source_permutation[i] for i in token_ids]].to(dtype)
    indices, coeffs = batch_omp(targets, source_anchors, k)
    return combine_anchor_rows(model_anchors, indices, coeffs.to(dtype))


class _ModelSide:
    """What a problem needs of one model of the merge, read when first asked for."""

    def __init__(self, model: ModelReference, trust_remote_code: bool) -> None:
        self.model = model
        self.trust_remote_code = trust_remote_code

    @cached_property
    def path(self) -> str:
        """The local directory mergekit reads the model from."""
        return str(Checkpoint.of(self.model).directory)

    @cached_property
    def config(self) -> PretrainedConfig:
        return self.model.config(trust_remote_code=self.trust_remote_code)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.path, self.trust_remote_code)

    @cached_property
    def vocabulary(self) -> Vocabulary:
        return vocabulary_of(self.tokenizer)

    def is_lm_head(self, names: set[str]) -> bool:
        """Whether a tensor called one of ``names`` is this model's untied LM head."""
        checkpoint = Checkpoint.of(self.model)
        located = vocabulary_tensors(
            self.config,
            set(checkpoint.names),
            checkpoint.shapes(),
            trust_remote_code=self.trust_remote_code,
            path=self.path,
        )
        return located.lm_head is not None and not located.tied and located.lm_head.name in names


def fill_problem(
    rows: dict[ModelReference, torch.Tensor],
    permutations: dict[ModelReference, Permutation],
    fill: _Fill,
    token_ids: list[int],
    anchor_ids: list[int],
    *,
    model: _ModelSide,
    source: _ModelSide,
    output_tokenizer: PreTrainedTokenizerBase,
    output_vocabulary: Vocabulary,
    is_lm_head: bool,
    seed: int,
) -> ApproximationProblem:
    """The transplant's problem for ``fill``: the lacking model is the base and the source
    the donor, in the output vocabulary's ids (the merged tokenizer is the donor's).

    The source's rows of the tokens the model lacks are the targets, the tokens both have
    the anchors; the base matrix is the model's own, in its own ids.
    """
    model_permutation = permutations[fill.model]
    return make_problem(
        ProblemSide(
            str(fill.model), rows[fill.model], model.vocabulary, model.tokenizer, model.config
        ),
        ProblemSide(
            str(fill.source),
            rows[fill.source],
            output_vocabulary,
            output_tokenizer,
            source.config,
            rows=permutations[fill.source],
        ),
        token_ids,
        (anchor_ids, [model_permutation[i] for i in anchor_ids]),
        is_lm_head=is_lm_head,
        batch_size=DEFAULT_BATCH_SIZE,
        progress=False,
        seed=seed,
    )


def fill_context(
    permutations: dict[ModelReference, Permutation], fill: _Fill, model: _ModelSide
) -> SelectionContext:
    """What a selector needs for ``fill``: the lacking model to run, and each output id it
    has with its own id (the rows it keeps)."""
    model_permutation = permutations[fill.model]
    model_ids = sorted(i for i, j in model_permutation.items() if j >= 0)
    return SelectionContext(
        base_path=model.path, matched_ids=(model_ids, [model_permutation[i] for i in model_ids])
    )


class OmpPermutedVocabulary(PermutedVocabulary):
    """mergekit's ``PermutedVocabulary`` with each lacking model's own rows for its missing
    tokens."""

    missing_tokens: Literal["omp", "mergekit"] = "mergekit"
    method: str = "auto"
    """The method of ``missing_tokens: omp``."""
    parameters: ImmutableMap[str, Any] | None = None
    """Its parameters, validated (``OmpMergeSettings.method_and_parameters``)."""
    default_k: int = DEFAULT_K
    seed: int = 0
    trust_remote_code: bool = False
    omp_tokens: ImmutableMap[str, OmpTokenSource] | None = None

    def execute(
        self, tokenizer_info: TokenizerInfo, tensors: dict[ModelReference, torch.Tensor]
    ) -> dict[ModelReference, torch.Tensor]:
        result = super().execute(tokenizer_info=tokenizer_info, tensors=tensors)
        models = list(tensors)
        if not result or len(models) < 2:
            return result
        views = vocabulary_views(list(tensors.values()), self.vocabulary_axis)
        rows = dict(zip(models, views, strict=True))
        if rows[models[0]].ndim != 2:
            return result  # one number per token (a bias): mergekit's rows
        vocab_size = len(tokenizer_info.tokenizer.get_vocab())
        permutations = tokenizer_info.permutations
        out = {model: result[model].movedim(self.vocabulary_axis, 0) for model in models}
        fills = self.fills(tokenizer_info, models)
        sides: dict[ModelReference, _ModelSide] = {}
        if any(fill.method != "omp" for fill in fills):
            output_vocabulary = vocabulary_of(tokenizer_info.tokenizer)
        for fill, token_ids in fills.items():
            anchor_ids = shared_token_ids(
                permutations[fill.model], permutations[fill.source], vocab_size
            )
            if fill.method == "omp":
                new_rows, choice = self._omp_rows(rows, permutations, fill, token_ids, anchor_ids)
            else:
                for model in (fill.model, fill.source):
                    sides.setdefault(model, _ModelSide(model, self.trust_remote_code))
                new_rows, choice = self._method_rows(
                    rows, tokenizer_info, output_vocabulary, fill, token_ids, anchor_ids, sides
                )
            out[fill.model][token_ids] = new_rows.to(out[fill.model].dtype)
            self._record(fill, len(token_ids), len(anchor_ids), choice)
        self._refresh_padding(out, vocab_size)
        return result

    def _omp_rows(
        self,
        rows: dict[ModelReference, torch.Tensor],
        permutations: dict[ModelReference, Permutation],
        fill: _Fill,
        token_ids: list[int],
        anchor_ids: list[int],
    ) -> tuple[torch.Tensor, None]:
        k = fill.k or self.default_k
        if k > len(anchor_ids):
            raise TransplantError(
                f"k={k} is larger than the {len(anchor_ids)} tokens {fill.model} "
                f"shares with {fill.source}"
            )
        new_rows = omp_rows(
            rows[fill.source],
            rows[fill.model],
            permutations[fill.source],
            permutations[fill.model],
            token_ids,
            anchor_ids,
            k,
        )
        return new_rows, None

    def _method_rows(
        self,
        rows: dict[ModelReference, torch.Tensor],
        tokenizer_info: TokenizerInfo,
        output_vocabulary: Vocabulary,
        fill: _Fill,
        token_ids: list[int],
        anchor_ids: list[int],
        sides: dict[ModelReference, _ModelSide],
    ) -> tuple[torch.Tensor, Choice | None]:
        """``self.method``'s rows on the transplant's problem (``fill_problem``), and
        ``auto``'s choice."""
        model = sides[fill.model]
        names = self.gather_tensors.weight_info.data[fill.model]
        problem = fill_problem(
            rows,
            tokenizer_info.permutations,
            fill,
            token_ids,
            anchor_ids,
            model=model,
            source=sides[fill.source],
            output_tokenizer=tokenizer_info.tokenizer,
            output_vocabulary=output_vocabulary,
            is_lm_head=model.is_lm_head({names.name, *(names.aliases or ())}),
            seed=self.seed,
        )
        result = approximate_new_rows(
            problem,
            get_approximator(fill.method),
            self.method_parameters,
            context=fill_context(tokenizer_info.permutations, fill, model),
        )
        choice = result.choice if isinstance(result, ChosenApproximation) else None
        return result.rows, choice

    @property
    def method_parameters(self) -> dict[str, Any]:
        """The parameters of ``self.method``, defaults filled in."""
        parameters = dict(self.parameters.items()) if self.parameters else {}
        return get_approximator(self.method).validate_parameters(parameters)

    def fills(
        self, tokenizer_info: TokenizerInfo, models: list[ModelReference]
    ) -> dict[_Fill, list[int]]:
        """Output ids to fill, grouped by (lacking model, source model, method, k): a token's
        own omp source is omp with its k (else ``default_k``); ``missing_tokens: omp`` fills
        with ``self.method``."""
        permutations = tokenizer_info.permutations
        explicit = dict(self.tokens.items()) if self.tokens else {}
        omp_tokens = dict(self.omp_tokens.items()) if self.omp_tokens else {}
        method_k = self.method_k
        groups: dict[_Fill, list[int]] = defaultdict(list)
        for token, token_id in sorted(
            tokenizer_info.tokenizer.get_vocab().items(), key=lambda kv: kv[1]
        ):
            token_source = omp_tokens.get(token)
            if token_source is None and (self.missing_tokens != "omp" or token in explicit):
                continue
            lacking = [m for m in models if not _has(permutations[m], token_id)]
            if not lacking:
                continue
            source = self._source_model(token, token_id, token_source, models, permutations)
            if source is None:  # mergekit warns about it too
                if token_source is not None:
                    LOG.warning("Token %r is in no model of the merge: its row stays zero", token)
                continue
            if token_source is not None:
                method, k = "omp", token_source.k or self.default_k
            else:
                method, k = self.method, method_k
            for model in lacking:
                groups[_Fill(model=model, source=source, method=method, k=k)].append(token_id)
        return dict(groups)

    @property
    def method_k(self) -> int | None:
        """The k ``self.method`` runs with, if it takes one."""
        if self.method == "omp":
            return self.method_parameters.get("k") or self.default_k
        return self.method_parameters.get("k")

    def _source_model(
        self,
        token: str,
        token_id: int,
        token_source: OmpTokenSource | None,
        models: list[ModelReference],
        permutations: dict[ModelReference, Permutation],
    ) -> ModelReference | None:
        """The model whose row of the token is approximated: the one named in the token's
        source, else the base model if it has the token, else the first model that has it."""
        if token_source is not None and token_source.model is not None:
            if token_source.model not in models or not _has(
                permutations[token_source.model], token_id
            ):
                raise TransplantError(
                    f"token {token!r}: its omp source model {token_source.model} lacks it"
                )
            return token_source.model
        if self.base_model in models and _has(permutations[self.base_model], token_id):
            return self.base_model
        return next((m for m in models if _has(permutations[m], token_id)), None)

    def _refresh_padding(self, out: dict[ModelReference, torch.Tensor], vocab_size: int) -> None:
        """mergekit fills padding rows with the mean row: recompute it with the OMP rows."""
        for matrix in out.values():
            if matrix.shape[0] > vocab_size:
                matrix[vocab_size:] = matrix[:vocab_size].mean(dim=0)

    def _record(self, fill: _Fill, tokens: int, anchors: int, choice: Choice | None) -> None:
        tensor = next(iter(self.gather_tensors.weight_info.data.values())).name
        parameters = {"k": fill.k} if fill.method == "omp" else self.method_parameters
        record = OmpFill(
            tensor=tensor,
            model=str(fill.model),
            source=str(fill.source),
            tokens=tokens,
            k=fill.k,
            anchors=anchors,
            method=fill.method,
            parameters=parameters,
            choice=choice,
        )
        chosen = f" (chose {choice.chosen})" if choice is not None else ""
        LOG.info(
            "%s: %d rows of %s by %s%s from %s",
            tensor,
            tokens,
            fill.model,
            fill.method,
            chosen,
            fill.source,
        )
        FILL_LOG.record(record)


@contextlib.contextmanager
def omp_token_rows(
    settings: OmpMergeSettings,
    token_sources: dict[str, OmpTokenSource],
    merge_options: MergeOptions | None = None,
) -> Iterator[list[OmpFill]]:
    """Within the block, mergekit's planner builds ``OmpPermutedVocabulary`` tasks; yields the
    list the tasks record their rows in. ``merge_options`` give the seed (``random_seed``)
    and whether tokenizers may run custom code."""
    merge_options = merge_options or MergeOptions()
    method, parameters = settings.method_and_parameters()
    original = getattr(mergekit.plan, "PermutedVocabulary", None)
    if original is not PermutedVocabulary:
        raise TransplantError("this mergekit version plans vocabularies differently; use 0.1.5")

    def permuted_vocabulary(**fields: object) -> OmpPermutedVocabulary:
        return OmpPermutedVocabulary(
            **fields,
            missing_tokens=settings.missing_tokens,
            method=method,
            parameters={key: _frozen(value) for key, value in parameters.items()},
            default_k=settings.omp_k,
            seed=merge_options.random_seed or 0,
            trust_remote_code=merge_options.trust_remote_code,
            omp_tokens=dict(token_sources) if token_sources else None,
        )

    mergekit.plan.PermutedVocabulary = permuted_vocabulary
    try:
        with FILL_LOG.collecting() as fills:
            yield fills
    finally:
        mergekit.plan.PermutedVocabulary = original
