"""The approximator interface: one problem in, base rows (and optionally coefficients) out."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from transformers import PreTrainedTokenizerBase

from mergekit_omp.errors import TransplantError
from mergekit_omp.vocabulary import Vocabulary

COMBINE_CHUNK = 256
"""Tokens whose anchor rows are gathered at once by ``combine_base_anchors``."""


@dataclass(frozen=True)
class ApproximationProblem:
    """Everything a method may use to make base rows for the donor's new tokens.

    Rows are float32 (float64 if the inputs were) on the work device. ``targets[i]`` is the
    donor row of donor token ``target_ids[i]``; ``donor_anchors[j]`` and ``base_anchors[j]``
    are the rows of the j-th shared token (donor id ``donor_anchor_ids[j]``, base id
    ``base_anchor_ids[j]``) in the two models.
    """

    targets: torch.Tensor
    donor_anchors: torch.Tensor
    base_anchors: torch.Tensor
    base_matrix: torch.Tensor
    target_ids: list[int]
    donor_anchor_ids: list[int]
    base_anchor_ids: list[int]
    donor_vocab: Vocabulary
    base_vocab: Vocabulary
    donor_tokenizer: PreTrainedTokenizerBase | None = None
    base_tokenizer: PreTrainedTokenizerBase | None = None
    is_lm_head: bool = False
    batch_size: int | None = None
    progress: bool = False
    seed: int = 0

    @property
    def num_targets(self) -> int:
        return self.targets.shape[0]

    @property
    def base_dim(self) -> int:
        return self.base_matrix.shape[1]

    def combine_base_anchors(self, indices: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Apply per-token coefficients over anchor ``indices`` to the base anchor rows.

        In chunks of ``COMBINE_CHUNK`` tokens: the gathered (B, k, D) rows of a whole
        vocabulary would be larger than the matrices themselves (0.5 GB for 3,131 tokens,
        k = 64, D = 640)."""
        rows = coeffs.new_empty((indices.shape[0], self.base_dim))
        for start in range(0, indices.shape[0], COMBINE_CHUNK):
            stop = start + COMBINE_CHUNK
            selected = self.base_anchors[indices[start:stop]].to(coeffs.dtype)  # (b, k, D)
            rows[start:stop] = torch.bmm(coeffs[start:stop].unsqueeze(1), selected).squeeze(1)
        return rows


@dataclass(frozen=True)
class Approximation:
    """Base rows for the problem's targets; coefficient methods also give their weights."""

    rows: torch.Tensor
    indices: torch.Tensor | None = None
    coeffs: torch.Tensor | None = None


ApproximatorFn = Callable[..., Approximation]


@dataclass(frozen=True)
class Approximator:
    name: str
    function: ApproximatorFn
    parameters: type[BaseModel]
    pretty_name: str
    reference_url: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return (inspect.getdoc(self.function) or self.pretty_name).splitlines()[0]

    def parameter_names(self) -> list[str]:
        return list(self.parameters.model_fields)

    def validate_parameters(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Typed, defaulted parameters; unknown names and wrong types raise TransplantError."""
        try:
            return self.parameters.model_validate(dict(params)).model_dump()
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']}"
                for e in exc.errors()
            )
            raise TransplantError(f"bad parameters for method '{self.name}': {problems}") from None

    def __call__(self, problem: ApproximationProblem, **params: Any) -> Approximation:
        return self.function(problem, **self.validate_parameters(params))


def parameters_model(name: str, function: ApproximatorFn) -> type[BaseModel]:
    """A frozen pydantic model of ``function``'s keyword-only arguments."""
    fields: dict[str, Any] = {}
    for param in inspect.signature(function).parameters.values():
        if param.kind != inspect.Parameter.KEYWORD_ONLY:
            continue
        annotation = param.annotation if param.annotation is not inspect.Parameter.empty else Any
        default = param.default if param.default is not inspect.Parameter.empty else ...
        fields[param.name] = (annotation, default)
    return create_model(
        f"{name.title().replace('_', '')}Parameters",
        __config__=ConfigDict(frozen=True, extra="forbid"),
        **fields,
    )


def approximator(
    name: str,
    *,
    pretty_name: str | None = None,
    reference_url: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[ApproximatorFn], Approximator]:
    """Make ``function(problem, *, param=default, ...)`` an approximator called ``name``."""

    def wrap(function: ApproximatorFn) -> Approximator:
        return Approximator(
            name=name,
            function=function,
            parameters=parameters_model(name, function),
            pretty_name=pretty_name or name,
            reference_url=reference_url,
            aliases=aliases,
        )

    return wrap
