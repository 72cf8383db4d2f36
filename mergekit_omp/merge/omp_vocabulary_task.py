"""One more token-embedding source for mergekit's merges: the OMP approximation.

In a merge with a merged vocabulary (``tokenizer: {source: union}``, or a model as source)
mergekit's ``PermutedVocabulary`` gives a model that lacks a token another model's row for it
(copied, or averaged over the models that have it): a row from a different embedding space.
``OmpPermutedVocabulary`` runs mergekit's ``PermutedVocabulary`` unchanged, then overwrites
those rows with the lacking model's own approximation: the row of a model that has the token
(the *source*) is written by OMP as a sparse combination of the tokens both models share
(the anchors), and the same coefficients are applied to the lacking model's anchor rows.

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
from typing import Literal

import mergekit.plan
import torch
from mergekit.common import ImmutableMap, ModelReference
from mergekit.tokenizer import PermutedVocabulary, TokenizerInfo
from mergekit.vocabulary import vocabulary_views

from mergekit_omp.approximate import work_dtype
from mergekit_omp.approximators.base import combine_anchor_rows
from mergekit_omp.errors import TransplantError
from mergekit_omp.kernels.omp import batch_omp
from mergekit_omp.merge.config import OmpMergeSettings, OmpTokenSource

LOG = logging.getLogger(__name__)

Permutation = dict[int, int]


@dataclass(frozen=True)
class OmpFill:
    """Rows of one tensor of one model that were made by OMP."""

    tensor: str
    model: str
    source: str
    tokens: int
    k: int
    anchors: int


@dataclass(frozen=True)
class _Fill:
    model: ModelReference
    source: ModelReference
    k: int


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


class OmpPermutedVocabulary(PermutedVocabulary):
    """mergekit's ``PermutedVocabulary`` with OMP rows for tokens a model lacks."""

    missing_tokens: Literal["omp", "mergekit"] = "mergekit"
    default_k: int = 64
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
        for fill, token_ids in self.fills(tokenizer_info, models).items():
            anchor_ids = shared_token_ids(
                permutations[fill.model], permutations[fill.source], vocab_size
            )
            if fill.k > len(anchor_ids):
                raise TransplantError(
                    f"k={fill.k} is larger than the {len(anchor_ids)} tokens {fill.model} "
                    f"shares with {fill.source}"
                )
            new_rows = omp_rows(
                rows[fill.source],
                rows[fill.model],
                permutations[fill.source],
                permutations[fill.model],
                token_ids,
                anchor_ids,
                fill.k,
            )
            out[fill.model][token_ids] = new_rows.to(out[fill.model].dtype)
            self._record(fill, len(token_ids), len(anchor_ids))
        self._refresh_padding(out, vocab_size)
        return result

    def fills(
        self, tokenizer_info: TokenizerInfo, models: list[ModelReference]
    ) -> dict[_Fill, list[int]]:
        """Output ids to fill by OMP, grouped by (lacking model, source model, k)."""
        permutations = tokenizer_info.permutations
        explicit = dict(self.tokens.items()) if self.tokens else {}
        omp_tokens = dict(self.omp_tokens.items()) if self.omp_tokens else {}
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
            k = token_source.k if token_source and token_source.k else self.default_k
            for model in lacking:
                groups[_Fill(model=model, source=source, k=k)].append(token_id)
        return dict(groups)

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

    def _record(self, fill: _Fill, tokens: int, anchors: int) -> None:
        tensor = next(iter(self.gather_tensors.weight_info.data.values())).name
        record = OmpFill(
            tensor=tensor,
            model=str(fill.model),
            source=str(fill.source),
            tokens=tokens,
            k=fill.k,
            anchors=anchors,
        )
        LOG.info("%s: %d rows of %s by OMP from %s", tensor, tokens, fill.model, fill.source)
        FILL_LOG.record(record)


@contextlib.contextmanager
def omp_token_rows(
    settings: OmpMergeSettings, token_sources: dict[str, OmpTokenSource]
) -> Iterator[list[OmpFill]]:
    """Within the block, mergekit's planner builds ``OmpPermutedVocabulary`` tasks; yields the
    list the tasks record their OMP rows in."""
    original = getattr(mergekit.plan, "PermutedVocabulary", None)
    if original is not PermutedVocabulary:
        raise TransplantError("this mergekit version plans vocabularies differently; use 0.1.5")

    def permuted_vocabulary(**fields: object) -> OmpPermutedVocabulary:
        return OmpPermutedVocabulary(
            **fields,
            missing_tokens=settings.missing_tokens,
            default_k=settings.k,
            omp_tokens=dict(token_sources) if token_sources else None,
        )

    mergekit.plan.PermutedVocabulary = permuted_vocabulary
    try:
        with FILL_LOG.collecting() as fills:
            yield fills
    finally:
        mergekit.plan.PermutedVocabulary = original
