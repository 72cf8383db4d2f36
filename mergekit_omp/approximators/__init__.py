"""Approximators: how a new token's base row is made from the rows both models share.

An approximator is one typed function registered by name::

    @approximator("omp", reference_url="https://arxiv.org/abs/2506.06607")
    def omp(problem: ApproximationProblem, *, k: Annotated[int, Field(ge=1)] = 64) -> Approximation:

Its keyword-only arguments are its parameters, each annotated (ranges in ``Annotated``),
validated by a pydantic model derived from the type hints when ``TransplantOptions`` is made. Built-ins and third-party methods alike are found through the Python
entry-point group ``mergekit_omp.approximators``; each entry point names an object made by
the ``@approximator`` decorator.
"""

from mergekit_omp.approximators.base import (
    Approximation,
    ApproximationProblem,
    Approximator,
    approximator,
)
from mergekit_omp.approximators.registry import (
    ENTRY_POINT_GROUP,
    approximator_names,
    get_approximator,
)
from mergekit_omp.approximators.spec import MethodSpec, parse_method_spec, split_method_spec

__all__ = [
    "ENTRY_POINT_GROUP",
    "Approximation",
    "ApproximationProblem",
    "Approximator",
    "MethodSpec",
    "approximator",
    "approximator_names",
    "get_approximator",
    "parse_method_spec",
    "split_method_spec",
]
