"""The approximator interface: one problem in, base rows (and optionally coefficients) out."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergekit_omp.errors import TransplantError
from mergekit_omp.vocabulary import Vocabulary

COMBINE_CHUNK = 16
"""Tokens whose anchor rows are gathered at once by ``combine_anchor_rows``, into one buffer
reused chunk after chunk. A fresh gathered block per chunk cost more in page faults than the
products: 1.25 s against 0.16 s for 3,131 tokens at k = 64, D = 3,840 (chunks of 256, fresh)."""
DEFAULT_BATCH_SIZE = 512
MAX_BATCH_SIZE = 2**31 - 1
"""The largest batch size taken (no vocabulary comes near it); -1 is one batch."""
"""Tokens approximated per batch unless ``--batch-size`` says otherwise."""


def combine_anchor_rows(
    anchors: torch.Tensor, indices: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    """Apply per-token coefficients over anchor ``indices`` to the ``anchors`` rows.

    In chunks of ``COMBINE_CHUNK`` tokens: the gathered (B, k, D) rows of a whole
    vocabulary would be larger than the matrices themselves (0.5 GB for 3,131 tokens,
    k = 64, D = 640)."""
    count, k = indices.shape
    rows = coeffs.new_empty((count, anchors.shape[1]))
    gathered = anchors.new_empty((min(count, COMBINE_CHUNK) * k, anchors.shape[1]))
    for start in range(0, count, COMBINE_CHUNK):
        stop = min(start + COMBINE_CHUNK, count)
        flat = indices[start:stop].reshape(-1)
        selected = torch.index_select(anchors, 0, flat, out=gathered[: flat.numel()])
        selected = selected.view(stop - start, k, anchors.shape[1]).to(coeffs.dtype)
        torch.bmm(coeffs[start:stop].unsqueeze(1), selected, out=rows[start:stop].unsqueeze(1))
    return rows


@dataclass(frozen=True)
class ApproximationProblem:
    """Everything a method may use to make base rows for the donor's new tokens.

    Donor rows are in ``work_dtype`` (float32, float64 if the inputs were) on the work
    device. ``targets[i]`` is the donor row of donor token ``target_ids[i]``;
    ``donor_anchors[j]`` and ``base_anchors[j]`` are the rows of the j-th shared token (donor
    id ``donor_anchor_ids[j]``, base id ``base_anchor_ids[j]``) in the two models.

    ``base_anchors`` keep the base matrix's dtype (bfloat16 for most checkpoints): methods
    convert what they read (``combine_base_anchors`` a few rows at a time). A float32 copy
    of a large vocabulary's anchors is 0.7 GB of fresh memory (46,018 x 3,840), which took
    1.6 s to make on the large-model benchmark, where OMP never reads it whole.

    ``base_matrix`` is the base's whole matrix as loaded, in its own dtype and not copied: a
    float32 copy of a large vocabulary (262,144 x 3,840) would be 4 GB, more than the rest of
    a transplant holds. Methods read it through ``base_rows``, ``base_mean`` or, when they
    need all of it in the work dtype, ``work_base_matrix``.
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
    base_config: PretrainedConfig | None = None
    donor_config: PretrainedConfig | None = None

    @property
    def num_targets(self) -> int:
        return self.targets.shape[0]

    @property
    def base_dim(self) -> int:
        return self.base_matrix.shape[1]

    @property
    def work_dtype(self) -> torch.dtype:
        return self.targets.dtype

    def base_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the base matrix in the work dtype."""
        return self.base_matrix[ids.to(self.base_matrix.device)].to(self.work_dtype)

    def base_mean(self) -> torch.Tensor:
        """The mean base row, accumulated in the work dtype."""
        return self.base_matrix.mean(dim=0, dtype=self.work_dtype)

    def work_base_matrix(self) -> torch.Tensor:
        """The whole base matrix in the work dtype (a copy unless it is stored so)."""
        return self.base_matrix.to(self.work_dtype)

    def new_rows(self, count: int) -> torch.Tensor:
        """``count`` zero rows in the work dtype, on the work device."""
        return self.targets.new_zeros(count, self.base_dim)

    def work_base_anchors(self) -> torch.Tensor:
        """The base anchor rows in the work dtype (a copy unless they are stored so)."""
        return self.base_anchors.to(self.work_dtype)

    def combine_base_anchors(self, indices: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Apply per-token coefficients over anchor ``indices`` to the base anchor rows."""
        return combine_anchor_rows(self.base_anchors, indices, coeffs)


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
        """Typed, defaulted, in-range parameters; anything else raises TransplantError.

        The one check of a method's parameters: ``TransplantOptions`` runs it when it is
        made (through ``check_parameters``), before any model is read."""
        try:
            return self.check_parameters(params)
        except ValidationError as exc:
            raise TransplantError(
                f"bad parameters for method '{self.name}': {describe_parameter_errors(exc)}"
            ) from None

    def check_parameters(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``validate_parameters`` raising pydantic's ``ValidationError`` (for models
        that nest it, such as ``TransplantOptions``)."""
        return self.parameters.model_validate(dict(params)).model_dump()

    def __call__(self, problem: ApproximationProblem, **params: Any) -> Approximation:
        """Run the method; ``params`` are already validated (``validate_parameters``)."""
        return self.function(problem, **params)


def describe_parameter_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']}" for e in exc.errors()
    )


def parameters_model(name: str, function: ApproximatorFn) -> type[BaseModel]:
    """A frozen pydantic model of ``function``'s keyword-only arguments.

    Types are read with ``typing.get_type_hints(include_extras=True)``, as mergekit's
    ``@merge_method`` does, so string annotations (``from __future__ import annotations``)
    resolve in the function's module and ``Annotated[int, Field(ge=1)]`` keeps its range.
    Every keyword-only argument must be annotated."""
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception as exc:
        raise TypeError(f"approximator '{name}': cannot resolve its type hints: {exc}") from exc
    fields: dict[str, Any] = {}
    for param in inspect.signature(function).parameters.values():
        if param.kind != inspect.Parameter.KEYWORD_ONLY:
            continue
        if param.name not in hints:
            raise TypeError(
                f"approximator '{name}': parameter '{param.name}' needs a type annotation"
            )
        default = param.default if param.default is not inspect.Parameter.empty else ...
        fields[param.name] = (hints[param.name], default)
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
