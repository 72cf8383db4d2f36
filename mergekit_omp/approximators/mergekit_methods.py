"""mergekit-tokensurgeon 0.1.5's methods that this package does not implement itself.

Each one runs mergekit's own code (``mergekit.tokensurgeon`` and
``mergekit.scripts.tokensurgeon``) on our problem: our anchors (tokens matched by bytes) in
place of mergekit's shared normalised strings, everything else as mergekit does it, so
``-a NAME`` means what it means to ``mergekit-tokensurgeon``:

* ``common_interpolation``: the k nearest anchors in the donor space (Euclidean, or cosine
  with ``cosine_similarity``) weighted by ``weight_scheme``; the weights applied to those
  anchors' base rows.
* ``randn``: standard normal rows (not scaled to the base's rows).
* ``john_hewitt``: rows drawn from a normal distribution with the mean and covariance of
  all base rows (Hewitt, 2021).
* ``landmark_pca``: the donor row mapped through the principal components of both anchor
  sets and the orthogonal Procrustes rotation between them.
* ``mp_rope``: matching pursuit that also fits a rotary position per anchor (the models'
  ``num_attention_heads`` and RoPE theta from their configs).
* ``stb``: refused with a message: mergekit 0.1.5's own ``stb`` fails on every input.

Random draws (``randn``, ``john_hewitt``, ``landmark_pca``'s randomised PCA) come from
torch's global generator, as in mergekit, seeded with ``--random-seed`` (the input
embeddings with the seed, the LM head with the seed + 1) inside ``torch.random.fork_rng``,
so a run is deterministic and leaves the caller's generator as it was. Differences from
mergekit, each because mergekit's code fails there: ``john_hewitt`` falls back to small
normal rows (0.02 standard deviation, mergekit's intended fallback) when the covariance is
not positive definite, where mergekit raises ``TypeError``; ``mp_rope`` reads the RoPE theta
from ``rope_parameters`` where the config has no ``rope_theta`` (transformers 5), where
mergekit raises ``AttributeError``.
"""

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import torch
from mergekit.scripts.tokensurgeon import john_hewitt_init
from mergekit.tokensurgeon import (
    DistanceMetric,
    WeightingScheme,
    batch_mp_rope,
    common_interp_approximate,
    landmark_pca_approximate,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_omp.approximators.base import (
    Approximation,
    ApproximationProblem,
    Approximator,
    approximator,
)
from mergekit_omp.approximators.similarity import no_targets, target_batches
from mergekit_omp.errors import TransplantError

TOKENSURGEON_URL = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/scripts/tokensurgeon.py"
DEFAULT_K = 64
"""mergekit-tokensurgeon's ``-k`` default, for every method that takes ``k``."""
DEFAULT_ROPE_THETA = 10000.0
JOHN_HEWITT_FALLBACK_STD = 0.02

Weighting = Literal["distance_proportional", "barycentric", "least_squares"]


@contextlib.contextmanager
def seeded_global_generator(problem: ApproximationProblem) -> Iterator[None]:
    """torch's global generator seeded for this matrix, restored afterwards."""
    device = problem.base_matrix.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(problem.seed + int(problem.is_lm_head))
        yield


def check_k(k: int, problem: ApproximationProblem) -> None:
    anchors = problem.donor_anchors.shape[0]
    if k > anchors:
        raise TransplantError(
            f"k={k} is larger than the number of shared anchor tokens ({anchors})"
        )


@approximator(
    "common_interpolation",
    pretty_name="Common-vocabulary interpolation (mergekit)",
    reference_url=TOKENSURGEON_URL,
)
def common_interpolation(
    problem: ApproximationProblem,
    *,
    k: Annotated[int, Field(ge=1)] = DEFAULT_K,
    cosine_similarity: bool = False,
    weight_scheme: Weighting = "distance_proportional",
) -> Approximation:
    """The k nearest anchors in the donor space, weighted by distance (mergekit's code)."""
    if problem.num_targets == 0:
        return no_targets(problem)
    check_k(k, problem)
    metric = DistanceMetric.COSINE if cosine_similarity else DistanceMetric.EUCLIDEAN
    anchors = problem.donor_anchors.float()
    rows, all_indices, all_coeffs = [], [], []
    for batch in target_batches(problem, "Interpolating"):
        indices, coeffs = common_interp_approximate(
            problem.targets[batch].float(),
            anchors,
            k=k,
            metric=metric,
            weight_scheme=WeightingScheme(weight_scheme),
        )
        coeffs = coeffs.float()
        rows.append(problem.combine_base_anchors(indices, coeffs))
        all_indices.append(indices)
        all_coeffs.append(coeffs)
    return Approximation(
        rows=torch.cat(rows), indices=torch.cat(all_indices), coeffs=torch.cat(all_coeffs)
    )


@approximator(
    "randn", pretty_name="Standard normal rows (mergekit)", reference_url=TOKENSURGEON_URL
)
def randn(problem: ApproximationProblem) -> Approximation:
    """Standard normal rows, seeded by --random-seed (mergekit's randn)."""
    base = problem.work_base_matrix()
    with seeded_global_generator(problem):
        rows = [
            torch.randn(
                batch.stop - batch.start, problem.base_dim, device=base.device, dtype=base.dtype
            )
            for batch in target_batches(problem, "Drawing")
        ]
    return Approximation(rows=torch.cat(rows) if rows else base.new_zeros(0, problem.base_dim))


def positive_definite_covariance(matrix: torch.Tensor) -> bool:
    """mergekit's test in ``john_hewitt_init``, made once for all batches."""
    rows = matrix.float()
    centered = rows - rows.mean(dim=0)
    covariance = centered.T @ centered / rows.shape[0]
    return bool(torch.distributions.constraints.positive_definite.check(covariance).all())


@approximator(
    "john_hewitt",
    pretty_name="Mean and covariance of the base rows (Hewitt, 2021)",
    reference_url="https://nlp.stanford.edu/~johnhew/vocab-expansion.html",
)
def john_hewitt(problem: ApproximationProblem) -> Approximation:
    """Rows drawn from a normal with the base rows' mean and covariance (mergekit's code)."""
    base = problem.work_base_matrix()
    pd = positive_definite_covariance(base)
    rows = []
    with seeded_global_generator(problem):
        for batch in target_batches(problem, "Drawing"):
            count = batch.stop - batch.start
            if pd:
                rows.append(john_hewitt_init(base, count))
            else:
                noise = torch.randn(count, problem.base_dim, device=base.device, dtype=base.dtype)
                rows.append(noise * JOHN_HEWITT_FALLBACK_STD)
    return Approximation(rows=torch.cat(rows) if rows else base.new_zeros(0, problem.base_dim))


@approximator(
    "landmark_pca",
    pretty_name="Landmark PCA with Procrustes rotation (mergekit)",
    reference_url=TOKENSURGEON_URL,
)
def landmark_pca(problem: ApproximationProblem) -> Approximation:
    """Principal components of both anchor sets, rotated onto each other (mergekit's code)."""
    if problem.num_targets == 0:
        return no_targets(problem)
    rows = []
    base_anchors = problem.work_base_anchors()
    with seeded_global_generator(problem):
        for batch in target_batches(problem, "Projecting"):
            rows.append(
                landmark_pca_approximate(
                    problem.targets[batch], problem.donor_anchors, base_anchors
                )
            )
    return Approximation(rows=torch.cat(rows))


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rope_geometry(config: Any, model: str) -> tuple[int, float]:
    """(attention heads, RoPE theta) of a model config, as mergekit's ``mp_rope`` reads them."""
    config = text_config(config)
    if config is None or getattr(config, "num_attention_heads", None) is None:
        raise TransplantError(f"mp_rope needs the {model} config's num_attention_heads")
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    return config.num_attention_heads, float(theta or DEFAULT_ROPE_THETA)


@approximator(
    "mp_rope",
    pretty_name="Matching pursuit with RoPE positions (mergekit)",
    reference_url=TOKENSURGEON_URL,
)
def mp_rope(
    problem: ApproximationProblem, *, k: Annotated[int, Field(ge=1)] = DEFAULT_K
) -> Approximation:
    """Matching pursuit over anchors rotated to their best RoPE position (mergekit's code)."""
    if problem.num_targets == 0:
        return no_targets(problem)
    check_k(k, problem)
    donor_heads, donor_theta = rope_geometry(problem.donor_config, "donor")
    base_heads, base_theta = rope_geometry(problem.base_config, "base")
    rows, all_indices, all_coeffs = [], [], []
    base_anchors = problem.work_base_anchors()
    for batch in target_batches(problem, "Matching pursuit"):
        indices, coeffs, batch_rows, _ = batch_mp_rope(
            problem.targets[batch],
            problem.donor_anchors,
            base_anchors,
            k=k,
            num_heads_a=donor_heads,
            num_heads_b=base_heads,
            a_rope_base=donor_theta,
            b_rope_base=base_theta,
        )
        rows.append(batch_rows)
        all_indices.append(indices)
        all_coeffs.append(coeffs)
    return Approximation(
        rows=torch.cat(rows), indices=torch.cat(all_indices), coeffs=torch.cat(all_coeffs)
    )


STB_BROKEN = (
    "method 'stb' is broken in mergekit-tokensurgeon 0.1.5 itself (its build_embedding_matrix "
    "passes its options object where compute_token_basis expects k, a TypeError on every "
    "input), so it has no meaning to reproduce; use omp, the method it was meant to improve on"
)


class StbParameters(BaseModel):
    """Refuses every parameter set, so ``-a stb`` fails before any model is read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def refuse(cls, value: Any) -> Any:
        raise TransplantError(STB_BROKEN)


def _stb(problem: ApproximationProblem, **_: Any) -> Approximation:
    raise TransplantError(STB_BROKEN)


stb = Approximator(
    name="stb",
    function=_stb,
    parameters=StbParameters,
    pretty_name="Sparse token basis (broken in mergekit 0.1.5)",
    reference_url=TOKENSURGEON_URL,
)
