"""Orthogonal Matching Pursuit (Goddard & Fernandes Neto, 2025).

Each new token's donor row is written as a k-sparse combination of donor anchor rows
(OMP in the donor space); the same coefficients applied to the base anchor rows give its
base row.
"""

from typing import Annotated

from pydantic import Field

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.kernels.omp import batch_omp

DEFAULT_K = 64
"""Anchors per new token (mergekit-tokensurgeon's ``-k`` default)."""


@approximator(
    "omp",
    pretty_name="Orthogonal Matching Pursuit",
    reference_url="https://arxiv.org/abs/2506.06607",
)
def omp(
    problem: ApproximationProblem,
    *,
    k: Annotated[int, Field(ge=1)] = DEFAULT_K,
    memory_gb: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None,
    screen: bool | None = None,
) -> Approximation:
    """Sparse anchor combination found by OMP in the donor space (default).

    ``memory_gb`` is the working memory allowed for OMP's anchor Gram matrix and per-chunk
    state (default: half of the memory available when it starts). OMP works through that
    Gram matrix or in embedding space, whichever its cost model expects to be faster; with
    less memory than the Gram matrix needs, in embedding space, within the budget.
    ``screen`` lets the embedding-space route find its candidates with a bfloat16 GEMM and
    check them in float32: the same picks, faster (default: where bfloat16 GEMMs are fast
    and D <= 1024; ``false`` turns it off).
    """
    anchors = problem.donor_anchors.shape[0]
    if k > anchors:
        raise TransplantError(
            f"k={k} is larger than the number of shared anchor tokens ({anchors})"
        )
    indices, coeffs = batch_omp(
        problem.targets,
        problem.donor_anchors,
        k,
        memory_budget_bytes=None if memory_gb is None else int(memory_gb * 1024**3),
        batch_size=problem.batch_size,
        screen=screen,
        progress=problem.progress,
    )
    rows = problem.combine_base_anchors(indices, coeffs)
    return Approximation(rows=rows, indices=indices, coeffs=coeffs)
