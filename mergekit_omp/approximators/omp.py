"""Orthogonal Matching Pursuit (Goddard & Fernandes Neto, 2025).

Each new token's donor row is written as a k-sparse combination of donor anchor rows
(OMP in the donor space); the same coefficients applied to the base anchor rows give its
base row.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated

import torch
from pydantic import Field

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.kernels.omp import batch_omp

DEFAULT_K = 64
"""Anchors per new token (mergekit-tokensurgeon's ``-k`` default)."""
SHARED_RUNS: ContextVar[dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar(
    "shared_omp_runs", default=None
)


@contextmanager
def shared_omp_runs() -> Iterator[None]:
    """Within this block, ``omp`` on the same problem tensors with the same k and screening
    runs once: methods built on OMP (``omp_ridge``, ``hybrid``) share it (``auto``)."""
    token = SHARED_RUNS.set({})
    try:
        yield
    finally:
        SHARED_RUNS.reset(token)


MemoryGb = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""Working memory for OMP in GB: a positive finite number (methods built on OMP take it too)."""


@approximator(
    "omp",
    pretty_name="Orthogonal Matching Pursuit",
    reference_url="https://arxiv.org/abs/2506.06607",
)
def omp(
    problem: ApproximationProblem,
    *,
    k: Annotated[int, Field(ge=1)] = DEFAULT_K,
    memory_gb: MemoryGb | None = None,
    screen: bool | None = None,
) -> Approximation:
    """Sparse anchor combination found by OMP in the donor space (default).

    ``memory_gb`` is the working memory allowed for OMP's anchor Gram matrix (float32 or
    int8) and per-chunk state (default: 4x the size of OMP's inputs, at least 1 GiB, within
    half of the memory available when it starts). OMP takes whichever of its routes fits
    and is fastest by this machine's measured rates (``kernels/omp.plan_omp``); with less
    memory than a Gram matrix needs, it works in embedding space, within the budget.
    ``screen`` lets the embedding-space route find its candidates with a bfloat16 GEMM and
    check them in float32: the same picks, faster (default: where this machine's
    calibration measured bfloat16 GEMMs fast and D <= 1024; ``false`` turns it off).
    """
    anchors = problem.donor_anchors.shape[0]
    if k > anchors:
        raise TransplantError(
            f"k={k} is larger than the number of shared anchor tokens ({anchors})"
        )
    runs = SHARED_RUNS.get()
    key = (id(problem.targets), id(problem.donor_anchors), k, screen)
    if runs is not None and key in runs:
        indices, coeffs = (t.clone() for t in runs[key])
    else:
        indices, coeffs = batch_omp(
            problem.targets,
            problem.donor_anchors,
            k,
            memory_budget_bytes=None if memory_gb is None else int(memory_gb * 1024**3),
            batch_size=problem.batch_size,
            screen=screen,
            progress=problem.progress,
        )
        if runs is not None:
            runs[key] = (indices.clone(), coeffs.clone())
    rows = problem.combine_base_anchors(indices, coeffs)
    return Approximation(rows=rows, indices=indices, coeffs=coeffs)
