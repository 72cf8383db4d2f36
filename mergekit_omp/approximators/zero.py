"""Zero rows: the simplest baseline."""

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator


@approximator("zero", pretty_name="Zero")
def zero(problem: ApproximationProblem) -> Approximation:
    """Every new token gets an all-zero row."""
    rows = problem.new_rows(problem.num_targets)
    return Approximation(rows=rows)
