"""Mean of the base rows: the common "average embedding" baseline."""

from mergekit_omp.approximators.base import Approximation, ApproximationProblem, approximator


@approximator("mean", pretty_name="Mean")
def mean(problem: ApproximationProblem) -> Approximation:
    """Every new token gets the mean of all base rows."""
    row = problem.base_mean().unsqueeze(0)
    return Approximation(rows=row.expand(problem.num_targets, -1).clone())
