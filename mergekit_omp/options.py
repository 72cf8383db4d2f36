"""What a transplant does, as one frozen pydantic model.

The command line builds a ``TransplantOptions``; a YAML recipe validates into the same
model, so a recipe and a command line mean exactly the same thing.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergekit_omp.bos import BosPolicy
from mergekit_omp.match import MatchPolicy

Matrix = Literal["embed", "lm_head"]
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
    method: str = Field("omp", description="Approximator for tokens the base lacks")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Method parameters")
    embed: MatrixOverride | None = Field(None, description="Overrides for input embeddings")
    lm_head: MatrixOverride | None = Field(None, description="Overrides for the LM head")
    prefix_match: MatchScope = MatchScope.NO
    byte_match: MatchScope = MatchScope.NO
    magikarp: bool = Field(False, description="Ignore under-trained tokens (arXiv 2405.05417)")
    new_vocab_noise: float | None = Field(None, description="Gaussian noise std for new rows")
    new_vocab_scale: float | None = Field(None, description="Scale factor for new rows")
    pad_vocab_to_multiple_of: int | None = Field(None, gt=0)
    batch_size: int | None = Field(512, description="Tokens per approximation batch")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Output dtype of the new matrices (default: the base's)"
    )
    seed: int = Field(0, description="Seed for methods and noise that draw random numbers")
    guard: GuardMode = Field(
        "off",
        description="Flagged outlier rows (breaker tokens): clip to the base norm bound, "
        "shrink their coefficients (ridge), or leave them (off, the default: "
        "mergekit-tokensurgeon's rows; the audit still warns)",
    )
    bos: BosPolicy = Field(
        BosPolicy.MATCH_BASE,
        description="match_base: the output tokenizer inserts BOS exactly when the base's does; "
        "keep_donor: leave the donor tokenizer as it is (and warn if they differ)",
    )

    @field_validator("prefix_match", "byte_match", mode="before")
    @classmethod
    def _scope_from_bool(cls, value: Any) -> Any:
        """YAML reads ``yes``/``no`` as booleans: take them as the scopes of those names."""
        if isinstance(value, bool):
            return MatchScope.YES if value else MatchScope.NO
        return value

    def override(self, matrix: Matrix) -> MatrixOverride:
        return getattr(self, matrix) or MatrixOverride()

    def method_for(self, matrix: Matrix) -> str:
        return self.override(matrix).method or self.method

    def parameters_for(self, matrix: Matrix) -> dict[str, Any]:
        override = self.override(matrix)
        if override.parameters is not None:
            return dict(override.parameters)
        if override.method is not None and override.method != self.method:
            return {}
        return dict(self.parameters)

    def match_policy(self, matrix: Matrix) -> MatchPolicy:
        override = self.override(matrix)
        byte = override.byte_match
        prefix = override.prefix_match
        return MatchPolicy(
            byte_match=self.byte_match.applies_to(matrix) if byte is None else byte,
            prefix_match=self.prefix_match.applies_to(matrix) if prefix is None else prefix,
        )
