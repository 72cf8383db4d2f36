"""Every registered method keeps the approximator contract (``mergekit_omp.testing``), and
the checker catches a method that breaks it."""

from __future__ import annotations

import pytest
import torch

from mergekit_omp.approximators import (
    Approximation,
    ApproximationProblem,
    approximator,
    approximator_names,
    get_approximator,
)
from mergekit_omp.errors import TransplantError
from mergekit_omp.testing import ContractViolation, check_approximator

NOT_PLAIN_COMBINATIONS = {"omp_ridge", "hybrid", "mp_rope", "auto"}
"""Methods whose rows are not their reported combination of the base anchor rows:
``omp_ridge`` and ``hybrid`` add a mapped residual, ``mp_rope`` combines the anchors rotated
to their RoPE positions, ``auto`` reports the combination of the candidate it chose."""


def methods() -> list[str]:
    """Each registered method once (an alias is the same method), less those that refuse
    every parameter set (``stb``, broken in mergekit)."""
    names = {}
    for name in approximator_names():
        method = get_approximator(name)
        try:
            method.validate_parameters({})
        except TransplantError:
            continue
        names.setdefault(method.name, name)
    return sorted(names)


@pytest.mark.parametrize("name", methods())
def test_every_registered_method_keeps_the_contract(name):
    check_approximator(name, exact_combination=name not in NOT_PLAIN_COMBINATIONS)


def test_every_built_in_method_is_checked():
    assert {"omp", "fvt", "focus", "wechsel", "ridge", "hybrid", "mp_rope", "auto"} <= set(
        methods()
    )


def broken(body):
    return approximator("broken")(body)


def test_the_checker_catches_a_method_that_breaks_a_clause():
    def wrong_shape(problem: ApproximationProblem) -> Approximation:
        return Approximation(rows=problem.new_rows(problem.num_targets + 1))

    def mutating(problem: ApproximationProblem) -> Approximation:
        problem.target_ids.append(0)
        return Approximation(rows=problem.new_rows(problem.num_targets - 1))

    def unseeded(problem: ApproximationProblem) -> Approximation:
        return Approximation(rows=torch.randn(problem.num_targets, problem.base_dim))

    def nan_for_zero(problem: ApproximationProblem) -> Approximation:
        norms = problem.targets.norm(dim=1, keepdim=True)
        return Approximation(rows=(problem.targets / norms)[:, :1].expand(-1, problem.base_dim))

    def false_coefficients(problem: ApproximationProblem) -> Approximation:
        indices = torch.zeros(problem.num_targets, 1, dtype=torch.long)
        coeffs = torch.ones(problem.num_targets, 1, dtype=problem.work_dtype)
        return Approximation(
            rows=problem.new_rows(problem.num_targets), indices=indices, coeffs=coeffs
        )

    def half_rows(problem: ApproximationProblem) -> Approximation:
        return Approximation(
            rows=problem.base_rows(torch.zeros(problem.num_targets, dtype=torch.long)).half()
        )

    def bfloat16_sums(problem: ApproximationProblem) -> Approximation:
        row = problem.base_anchors.sum(dim=0).to(problem.work_dtype)
        return Approximation(rows=row.expand(problem.num_targets, -1).clone())

    cases = {
        wrong_shape: "rows of shape",
        mutating: "changed the problem",
        unseeded: "other rows",
        nan_for_zero: "a zero target row gave a non-finite row",
        false_coefficients: "do not reproduce its rows",
        half_rows: "not the work dtype",
        bfloat16_sums: "bfloat16 base anchors gave other rows",
    }
    for body, clause in cases.items():
        with pytest.raises(ContractViolation, match=clause):
            check_approximator(broken(body))
