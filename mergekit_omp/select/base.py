"""The selector interface: a method that chooses among methods.

A selector is called as a method is, with the problem and its parameters, plus what
choosing needs beyond the problem (``SelectionContext``: the base model to run and the
rows a transplant copies). It is registered in the approximators' entry-point group, so a
name such as ``auto`` is a ``-a`` value, a recipe's ``method`` and a merge's ``omp.method``
like any other; the approximate stage gives it its context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergekit_omp.approximators.base import (
    Approximation,
    ApproximationProblem,
    Approximator,
    parameters_model,
)
from mergekit_omp.records import JsonFloat, Record, omitted


@dataclass(frozen=True)
class SelectionContext:
    """What a selector needs beyond the problem, to run the base model on a text."""

    base_path: str | None = None
    """Where the base model is."""
    matched_ids: tuple[list[int], list[int]] | None = None
    """Donor and base ids of every matched token (anchors, special and forced pairs): the
    rows the assembled matrix copies from the base."""


class Choice(Record):
    """What a selector chose and why: the report's ``choice`` of a matrix, a merge's fill."""

    chosen: str
    """The winning candidate spec, as given (``omp:k=16``)."""
    method: str
    parameters: dict[str, Any]
    """The chosen method's parameters, defaults filled in."""
    scores: dict[str, JsonFloat]
    """Each candidate's score (a failed one: inf for bits per byte, -inf for cosine)."""
    validation: str
    """How the candidates were scored, and which way is better."""
    evidence: str
    """What the scores were measured on (bytes of text, held-out tokens)."""
    scores_by_kind: dict[str, dict[str, JsonFloat]] | None = omitted()
    """By text: each candidate's bits per byte on each kind of validation text (``scores``
    are then the regrets, ``select/auto.minimax_regret``)."""
    seconds: float | None = omitted()
    """Time the choice took; a transplant's report moves it to its ``seconds``."""


@dataclass(frozen=True)
class ChosenApproximation(Approximation):
    """The chosen method's rows, and the validation that chose it."""

    choice: Choice = dataclasses.field(kw_only=True)


SelectorFn = Callable[..., ChosenApproximation]


@dataclass(frozen=True)
class Selector(Approximator):
    """An approximator whose function also takes a ``SelectionContext``."""

    def __call__(
        self,
        problem: ApproximationProblem,
        context: SelectionContext | None = None,
        **params: Any,
    ) -> Approximation:
        return self.function(problem, context or SelectionContext(), **params)


def selector(
    name: str, *, pretty_name: str | None = None, reference_url: str | None = None
) -> Callable[[SelectorFn], Selector]:
    """Make ``function(problem, context, *, param=default, ...)`` a selector called ``name``."""

    def wrap(function: SelectorFn) -> Selector:
        return Selector(
            name=name,
            function=function,
            parameters=parameters_model(name, function),
            pretty_name=pretty_name or name,
            reference_url=reference_url,
        )

    return wrap
