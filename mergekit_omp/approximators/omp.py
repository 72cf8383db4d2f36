"""Orthogonal Matching Pursuit (Goddard & Fernandes Neto, 2025).

Each new token's donor row is written as a k-sparse combination of donor anchor rows
(OMP in the donor space); the same coefficients applied to the base anchor rows give its
base row.
"""

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.omp import batch_omp


@approximator(
    "omp",
    pretty_name="Orthogonal Matching Pursuit",
    reference_url="https://arxiv.org/abs/2506.06607",
)
def omp(
    problem: ApproximationProblem,
    *,
    k: int = 64,
    memory_gb: float | None = None,
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
    if memory_gb is not None and memory_gb <= 0:
        raise TransplantError(f"memory_gb must be positive, got {memory_gb}")
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
