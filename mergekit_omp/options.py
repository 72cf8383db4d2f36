"""What a transplant does, as one frozen pydantic model.

The command line builds a ``TransplantOptions``; a YAML recipe validates into the same
model (``recipe.py`` reads and writes recipes), so a recipe and a command line mean exactly
the same thing. ``describe_validation_error`` turns a pydantic error into one line naming
the key, for recipes, merge configurations and the command line alike.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Collection
from typing import Annotated, Any, Literal

from mergekit.common import ModelReference
from mergekit.tokenizer.config import ModelTokenEmbedding, TokenEmbeddingConfig
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from mergekit_omp.approximators import Approximator, get_approximator
from mergekit_omp.approximators.base import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE
from mergekit_omp.bos import BosPolicy
from mergekit_omp.errors import TransplantError
from mergekit_omp.match import MatchPolicy

Matrix = Literal["embed", "lm_head"]


def _known_method(name: str) -> str:
    _method_named(name)
    return name


def _parameters_fit_method(parameters: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    if "method" in info.data:  # else the method itself failed
        _check_parameters(info.data["method"], parameters)
    return parameters


MethodName = Annotated[str, AfterValidator(_known_method)]
"""A registered approximator's name, checked when read (recipes and merge configurations)."""
MethodParameters = Annotated[dict[str, Any], AfterValidator(_parameters_fit_method)]
"""The parameters of the ``method`` field declared before them, checked against its
signature."""
GuardMode = Literal["off", "clip", "shrink"]
"""What to do with approximated rows the audit flags (see docs/diagnostics.md)."""


class MatchScope(str, enum.Enum):
    """Which matrices a matching rule applies to (mergekit-tokensurgeon's ``-pm``/``-bm``)."""

    NO = "no"
    YES = "yes"
    EMBED = "embed"
    LM_HEAD = "lm_head"

    def applies_to(self, matrix: Matrix) -> bool:
        return self == MatchScope.YES or self.value == matrix


class MatrixOverride(BaseModel):
    """Settings for one matrix that differ from the transplant-wide ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str | None = None
    parameters: dict[str, Any] | None = None
    prefix_match: bool | None = None
    byte_match: bool | None = None


class TransplantOptions(BaseModel):
    """One transplant: give ``base_model`` the tokenizer of ``donor``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = Field(description="Model whose weights are kept (path)")
    donor: str = Field(description="Model whose tokenizer is transplanted (path)")
    method: MethodName = Field("auto", description="Approximator for tokens the base lacks")
    parameters: MethodParameters = Field(default_factory=dict, description="Method parameters")
    embed: MatrixOverride | None = Field(None, description="Overrides for input embeddings")
    lm_head: MatrixOverride | None = Field(None, description="Overrides for the LM head")
    prefix_match: MatchScope = MatchScope.NO
    byte_match: MatchScope = MatchScope.NO
    magikarp: bool = Field(False, description="Ignore under-trained tokens (arXiv 2405.05417)")
    new_vocab_noise: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Gaussian noise std for new rows"
    )
    new_vocab_scale: float | None = Field(
        None, allow_inf_nan=False, description="Scale factor for new rows"
    )
    pad_vocab_to_multiple_of: int | None = Field(None, gt=0)
    batch_size: int | None = Field(
        DEFAULT_BATCH_SIZE, description="Tokens per approximation batch (-1: one batch)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Output dtype of the new matrices (default: the base's)"
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,  # numpy's seeds, which mergekit's --random-seed also sets
        description="Seed for methods and noise that draw random numbers",
    )
    guard: GuardMode = Field(
        "off",
        description="Flagged outlier rows (breaker tokens): clip to the base norm bound, "
        "shrink their coefficients (ridge), or leave them (off, the default: "
        "mergekit-tokensurgeon's rows; the audit still warns)",
    )
    bos: BosPolicy = Field(
        BosPolicy.KEEP_DONOR,
        description="keep_donor (default): the output tokenizer is the donor's, unchanged, so "
        "the output can draft for the donor's models (llama.cpp refuses a draft whose BOS "
        "insertion differs), with a warning when the base expects otherwise; match_base: the "
        "output tokenizer inserts BOS exactly when the base's does (better on its own)",
    )
    tokens: dict[str, TokenEmbeddingConfig] | None = Field(
        None,
        description="Donor tokens that take a given base token's row, in mergekit's "
        '`tokenizer.tokens` syntax: `"<|im_start|>": {source: {kind: model_token, model: '
        'BASE, token: "<start_of_turn>"}}` (or `token_id: N`), or `source: BASE` for the '
        "base's token of the same string",
    )

    @field_validator("prefix_match", "byte_match", mode="before")
    @classmethod
    def _scope_from_bool(cls, value: Any) -> Any:
        """YAML reads ``yes``/``no`` as booleans: take them as the scopes of those names."""
        if isinstance(value, bool):
            return MatchScope.YES if value else MatchScope.NO
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size_in_range(cls, size: int | None) -> int | None:
        if size is None or size == -1 or 1 <= size <= MAX_BATCH_SIZE:
            return size
        raise PydanticCustomError(
            "batch_size",
            "{size} is not a batch size: give a whole number of tokens from 1 to {most}, or "
            "-1 for one batch",
            {"size": size, "most": MAX_BATCH_SIZE},
        )

    @field_validator("tokens")
    @classmethod
    def _tokens_take_base_rows(
        cls, tokens: dict[str, TokenEmbeddingConfig] | None
    ) -> dict[str, TokenEmbeddingConfig] | None:
        for token, entry in (tokens or {}).items():
            if not isinstance(entry.source, ModelTokenEmbedding | ModelReference):
                raise PydanticCustomError(
                    "token_source",
                    "{token}: a transplant gives a donor token a base token's row: the source "
                    "is {{kind: model_token, model: BASE, token: ...}} or BASE",
                    {"token": token},
                )
        return tokens

    @field_validator("embed", "lm_head")
    @classmethod
    def _override_fits_method(
        cls, override: MatrixOverride | None, info: ValidationInfo
    ) -> MatrixOverride | None:
        if override is None or "method" not in info.data or "parameters" not in info.data:
            return override
        if override.method is not None:
            _method_named(override.method, loc=("method",))
        method, parameters = _override_choice(
            info.data["method"], info.data["parameters"], override
        )
        _check_parameters(method, parameters, loc=("parameters",))
        return override

    def override(self, matrix: Matrix) -> MatrixOverride:
        return getattr(self, matrix) or MatrixOverride()

    def method_for(self, matrix: Matrix) -> str:
        return self.override(matrix).method or self.method

    def parameters_for(self, matrix: Matrix) -> dict[str, Any]:
        """The parameters as written (validated when the options were made)."""
        return _override_choice(self.method, self.parameters, self.override(matrix))[1]

    def method_and_parameters(self, matrix: Matrix) -> tuple[Approximator, dict[str, Any]]:
        """The matrix's method and its parameters with their defaults filled in."""
        method = get_approximator(self.method_for(matrix))
        return method, method.validate_parameters(self.parameters_for(matrix))

    def match_policy(self, matrix: Matrix) -> MatchPolicy:
        override = self.override(matrix)
        byte = override.byte_match
        prefix = override.prefix_match
        return MatchPolicy(
            byte_match=self.byte_match.applies_to(matrix) if byte is None else byte,
            prefix_match=self.prefix_match.applies_to(matrix) if prefix is None else prefix,
        )


def _override_choice(
    method: str, parameters: dict[str, Any], override: MatrixOverride
) -> tuple[str, dict[str, Any]]:
    """(method, parameters) of a matrix: an override's method does not inherit parameters
    meant for another method."""
    name = override.method or method
    if override.parameters is not None:
        return name, dict(override.parameters)
    if override.method is not None and override.method != method:
        return name, {}
    return name, dict(parameters)


def _method_named(name: str, loc: tuple[str, ...] = ()) -> Approximator:
    try:
        return get_approximator(name)
    except TransplantError as exc:
        error = PydanticCustomError("unknown_method", "{message}", {"message": str(exc)})
        if not loc:
            raise error from None
        raise _nested([InitErrorDetails(type=error, loc=loc, input=name)]) from None


def _check_parameters(name: str, parameters: dict[str, Any], loc: tuple[str, ...] = ()) -> None:
    """The method's own parameter model, errors nested under ``loc`` (+ the parameter)."""
    method = get_approximator(name)
    try:
        method.check_parameters(parameters)
    except ValidationError as exc:
        raise _nested(
            [
                InitErrorDetails(
                    type=PydanticCustomError(
                        "method_parameter", "{message}", {"message": _message(error, method)}
                    ),
                    loc=(*loc, *error["loc"]),
                    input=error["input"],
                )
                for error in exc.errors()
            ]
        ) from None


def _message(error: ErrorDetails, method: Approximator) -> str:
    if error["type"] != "extra_forbidden":
        return f"{error['msg']} (method '{method.name}')"
    close = difflib.get_close_matches(str(error["loc"][-1]), method.parameter_names(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"method '{method.name}' takes no such parameter{hint}"


def _nested(errors: list[InitErrorDetails]) -> ValidationError:
    return ValidationError.from_exception_data("MethodParameters", errors)


def _did_you_mean(key: str, candidates: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe_validation_error(
    exc: ValidationError,
    source: str | None = None,
    *,
    prefix: tuple[str, ...] = (),
    candidates: Collection[str] = (),
) -> str:
    """One line naming each offending key, such as
    ``recipe.yml: unknown key 'metod' (did you mean ...)`` or (no source: a command line)
    ``parameters.k: Input should be greater than or equal to 1 (method 'omp')``."""
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in (*prefix, *error["loc"]))
        if error["type"] == "extra_forbidden":
            hint = _did_you_mean(str(error["loc"][-1]), candidates)
            problems.append(f"unknown key '{loc}'{hint}")
        elif error["type"] == "missing":
            problems.append(f"missing key '{loc}'")
        else:
            problems.append(f"{loc}: {error['msg']}")
    line = "; ".join(problems)
    return f"{source}: {line}" if source is not None else line
