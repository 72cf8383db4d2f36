"""Zero rows: the simplest baseline."""

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator


@approximator("zero", pretty_name="Zero")
def zero(problem: ApproximationProblem) -> Approximation:
    """Every new token gets an all-zero row."""
    rows = problem.base_matrix.new_zeros(problem.num_targets, problem.base_dim)
    return Approximation(rows=rows)
