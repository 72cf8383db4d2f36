"""The approximator contract, as a check any method's author can run (docs/plugins.md)::

    from mergekit_omp.testing import check_approximator
    check_approximator("scaled_mean", {"factor": 3})

``check_approximator`` runs a method on small synthetic problems (``contract_problem``:
byte tokens FVT can spell, model configs for ``mp_rope``, no model files) and raises
``ContractViolation`` naming the first clause the method breaks:

* rows of shape (targets, base dim), finite, in the problem's work dtype;
* a zero target row and a duplicated target give finite rows too;
* the same anchors and rows from the same problem and seed (randomness drawn from
  ``problem.seed``), the rows to within float rounding: BLAS may sum in another order from
  one call to the next (mergekit's ``mp_rope`` differs by about 1e-6);
* the problem is not mutated (its tensors, ids and vocabularies);
* reported ``indices`` and ``coeffs`` are (targets, k), in range and finite, and
  ``problem.combine_base_anchors(indices, coeffs)`` reproduces each row with a non-zero
  coefficient (all-zero coefficients mark a row that is no combination, as FOCUS's
  fallback for a zero target); ``exact_combination=False`` for a method that adds to the
  combination (``omp_ridge`` and ``hybrid`` add the mapped residual) or combines other
  rows (``mp_rope``: the anchors rotated to their RoPE positions);
* bfloat16 base anchors (the dtype of most checkpoints) give the rows of the same values
  in float32.

A selector (``auto``) is run without a model to run (leave-out validation).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PretrainedConfig

from mergekit_omp.approximators import Approximation, ApproximationProblem, Approximator
from mergekit_omp.approximators.registry import get_approximator
from mergekit_omp.vocabulary import Encoding, TokenForm, TokenKind, Vocabulary

BASE_TOKENS = (string.ascii_letters + string.digits + string.punctuation)[:80]
"""One-character base tokens; every one is an anchor (the donor has it too)."""
TARGETS = 12
DONOR_DIM, BASE_DIM = 8, 12


class ContractViolation(AssertionError):
    """A method broke a clause of the approximator contract."""


def vocabulary(tokens: list[str]) -> Vocabulary:
    forms = {i: TokenForm(TokenKind.TEXT, token.encode()) for i, token in enumerate(tokens)}
    strings = dict(enumerate(tokens))
    return Vocabulary(forms=forms, strings=strings, special_ids={}, encoding=Encoding.PLAIN)


def target_tokens(count: int) -> list[str]:
    """Three-character donor tokens the base spells with its one-character tokens."""
    n = len(BASE_TOKENS)
    return [
        BASE_TOKENS[i % n] + BASE_TOKENS[(3 * i + 1) % n] + BASE_TOKENS[(7 * i + 2) % n]
        for i in range(count)
    ]


def contract_problem(
    seed: int = 0, base_dtype: torch.dtype = torch.float32
) -> ApproximationProblem:
    """Anchors whose base rows are a noisy linear map of their donor rows, and targets among
    which one is a zero row and the last duplicates the one before it (same id, same row)."""
    generator = torch.Generator().manual_seed(seed)
    anchors = len(BASE_TOKENS)
    donor_anchors = torch.randn(anchors, DONOR_DIM, generator=generator)
    mapping = torch.randn(DONOR_DIM, BASE_DIM, generator=generator)
    noise = 0.1 * torch.randn(anchors, BASE_DIM, generator=generator)
    base_matrix = (donor_anchors @ mapping + noise).to(base_dtype)
    targets = torch.randn(TARGETS, DONOR_DIM, generator=generator)
    targets[0] = 0
    targets[-1] = targets[-2]
    target_ids = list(range(anchors, anchors + TARGETS))
    target_ids[-1] = target_ids[-2]
    ids = list(range(anchors))
    config = PretrainedConfig.from_dict({"num_attention_heads": 2, "rope_theta": 10_000.0})
    return ApproximationProblem(
        targets=targets,
        donor_anchors=donor_anchors,
        base_anchors=base_matrix.clone(),
        base_matrix=base_matrix,
        target_ids=target_ids,
        donor_anchor_ids=ids,
        base_anchor_ids=ids,
        donor_vocab=vocabulary(list(BASE_TOKENS) + target_tokens(TARGETS)),
        base_vocab=vocabulary(list(BASE_TOKENS)),
        batch_size=5,
        seed=seed,
        base_config=config,
        donor_config=config,
    )


def check_approximator(
    method: Approximator | str,
    parameters: Mapping[str, Any] | None = None,
    *,
    exact_combination: bool = True,
    seed: int = 0,
) -> None:
    """Raise ``ContractViolation`` if ``method`` (with ``parameters``, validated) breaks the
    contract (module docstring)."""
    method = get_approximator(method) if isinstance(method, str) else method
    params = method.validate_parameters(parameters or {})
    problem = contract_problem(seed)
    snapshot = copy_of(problem)
    result = method(problem, **params)
    check(not differs(problem, snapshot), method, "it changed the problem it was given")
    check_rows(method, problem, result)
    check_determinism(method, problem, params, result)
    check_coefficients(method, problem, result, exact_combination)
    check_bfloat16(method, params, seed)


def check(condition: bool, method: Approximator, clause: str) -> None:
    if not condition:
        raise ContractViolation(f"approximator '{method.name}': {clause}")


def check_determinism(
    method: Approximator,
    problem: ApproximationProblem,
    params: dict[str, Any],
    result: Approximation,
) -> None:
    again = method(problem, **params)
    same_anchors = (again.indices is None and result.indices is None) or (
        again.indices is not None
        and result.indices is not None
        and torch.equal(again.indices, result.indices)
    )
    check(same_anchors, method, "the same problem and seed gave other anchors")
    check(
        torch.allclose(again.rows, result.rows, rtol=1e-5, atol=1e-5),
        method,
        "the same problem and seed gave other rows",
    )


def check_rows(method: Approximator, problem: ApproximationProblem, result: Approximation) -> None:
    rows = result.rows
    expected = (problem.num_targets, problem.base_dim)
    check(
        tuple(rows.shape) == expected, method, f"rows of shape {tuple(rows.shape)}, not {expected}"
    )
    check(
        rows.dtype == problem.work_dtype,
        method,
        f"rows in {rows.dtype}, not the work dtype {problem.work_dtype}",
    )
    finite = torch.isfinite(rows).all(dim=1)
    check(bool(finite[0]), method, "a zero target row gave a non-finite row")
    check(bool(finite[-2:].all()), method, "a duplicated target gave a non-finite row")
    check(bool(finite.all()), method, "non-finite rows")


def check_coefficients(
    method: Approximator, problem: ApproximationProblem, result: Approximation, exact: bool
) -> None:
    indices, coeffs = result.indices, result.coeffs
    if indices is None and coeffs is None:
        return
    check(indices is not None and coeffs is not None, method, "indices without coeffs or back")
    assert indices is not None and coeffs is not None
    if indices.numel() == 0 and coeffs.numel() == 0:
        return  # no combination to report (a method that reports none for some inputs)
    check(
        indices.ndim == 2
        and indices.shape == coeffs.shape
        and indices.shape[0] == problem.num_targets,
        method,
        f"indices {tuple(indices.shape)} and coeffs {tuple(coeffs.shape)} are not (targets, k)",
    )
    anchors = problem.donor_anchors.shape[0]
    check(bool(((indices >= 0) & (indices < anchors)).all()), method, "indices outside the anchors")
    check(bool(torch.isfinite(coeffs).all()), method, "non-finite coefficients")
    if exact:
        combined = problem.combine_base_anchors(indices, coeffs.to(problem.work_dtype))
        combination = coeffs.ne(0).any(dim=1)
        check(
            torch.allclose(combined[combination], result.rows[combination], rtol=1e-4, atol=1e-4),
            method,
            "its indices and coefficients do not reproduce its rows",
        )


def check_bfloat16(method: Approximator, params: dict[str, Any], seed: int) -> None:
    half = contract_problem(seed, base_dtype=torch.bfloat16)
    full = dataclasses.replace(
        half, base_matrix=half.base_matrix.float(), base_anchors=half.base_anchors.float()
    )
    rows = method(half, **params).rows
    check(rows.dtype == half.work_dtype, method, f"bfloat16 anchors gave rows in {rows.dtype}")
    check(
        torch.allclose(rows, method(full, **params).rows, rtol=1e-5, atol=1e-5),
        method,
        "bfloat16 base anchors gave other rows than the same values in float32",
    )


def copy_of(problem: ApproximationProblem) -> dict[str, Any]:
    return {
        field.name: (value.clone() if isinstance(value, torch.Tensor) else _copied(value))
        for field in dataclasses.fields(problem)
        for value in [getattr(problem, field.name)]
    }


def _copied(value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, Vocabulary):
        return dataclasses.replace(value, forms=dict(value.forms), strings=dict(value.strings))
    return value


def differs(problem: ApproximationProblem, snapshot: dict[str, Any]) -> bool:
    for name, before in snapshot.items():
        now = getattr(problem, name)
        if isinstance(before, torch.Tensor):
            if (
                now.dtype != before.dtype
                or now.shape != before.shape
                or not torch.equal(now, before)
            ):
                return True
        elif now != before:
            return True
    return False
