"""mergekit_omp.kernels.omp.batch_omp must give mergekit's answers, faster, in bounded memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from mergekit.tokensurgeon import batch_omp as mergekit_batch_omp

from mergekit_omp.kernels import omp
from mergekit_omp.kernels.calibrate import REFERENCE_RATES
from mergekit_omp.kernels.omp import (
    OmpPlan,
    batch_omp,
    even_chunks,
    gram_matrix,
    plan_call,
    plan_omp,
    recorded_calls,
    route_seconds,
    screens_by_default,
)
from mergekit_omp.kernels.omp_int8_gram import Int8Gram
from mergekit_omp.kernels.omp_screen import Bf16Screen

# Budget small enough that an N = 600 Gram (1.4 MB in float32) cannot be held.
TINY_BUDGET = 400_000


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """These inputs are small: one thread avoids OpenMP barrier stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(rows: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator, dtype=torch.float64).to(dtype)


def correlated_anchors(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Embedding-like anchors: a shared mean direction and singular values spanning 100x."""
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -2, dim, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    mean = 0.5 * torch.randn(dim, generator=generator, dtype=torch.float64)
    latent = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    return (latent * spectrum @ basis.T + mean).float()


def reconstruct(indices: torch.Tensor, coeffs: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bk,bkd->bd", coeffs.to(torch.float64), points.to(torch.float64)[indices])


def same_support(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Per target: did both select the same set of anchors?"""
    return (ours.sort(dim=1).values == theirs.sort(dim=1).values).all(dim=1)


def is_near_tie(
    ours: torch.Tensor,
    theirs: torch.Tensor,
    target: torch.Tensor,
    points: torch.Tensor,
    rtol: float = 1e-5,
) -> bool:
    """At the first step where the two selections differ, were both picks equally good?

    Scores are recomputed in float64 from the residual after the common prefix, so a
    difference is excused only when float32 rounding could decide it.
    """
    step = int((ours != theirs).nonzero()[0])
    points64, target64 = points.double(), target.double()
    prefix = points64[ours[:step]]
    if step:
        solution = torch.linalg.lstsq(prefix.T, target64.unsqueeze(1)).solution.squeeze(1)
        target64 = target64 - prefix.T @ solution
    scores = (points64 @ target64).abs()
    ours_score, their_score = scores[ours[step]], scores[theirs[step]]
    return bool((ours_score - their_score).abs() <= rtol * torch.maximum(ours_score, their_score))


def assert_matches_mergekit(
    targets: torch.Tensor, points: torch.Tensor, k: int, rtol: float = 1e-4, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Supports equal as sets for >= 99.9% of targets (near-ties aside), reconstructions
    of the targets whose supports agree equal to ``rtol``."""
    ours_idx, ours_coeffs = batch_omp(targets, points, k, **kwargs)
    ref_idx, ref_coeffs = mergekit_batch_omp(targets, points, k)
    assert ours_idx.shape == ref_idx.shape and ours_coeffs.dtype == ref_coeffs.dtype

    agree = same_support(ours_idx, ref_idx)
    differ = (~agree).nonzero().flatten().tolist()
    ties = [b for b in differ if is_near_tie(ours_idx[b], ref_idx[b], targets[b], points)]
    assert len(ties) <= 0.01 * targets.shape[0], f"{len(ties)} near-ties"
    assert len(differ) - len(ties) <= 0.001 * targets.shape[0], f"differ: {differ}, ties: {ties}"

    points_work = points.to(ours_coeffs.dtype)
    ours_rec = reconstruct(ours_idx[agree], ours_coeffs[agree], points_work)
    ref_rec = reconstruct(ref_idx[agree], ref_coeffs[agree], points_work)
    scale = ref_rec.norm(dim=1).clamp(min=1e-12)
    assert float(((ours_rec - ref_rec).norm(dim=1) / scale).max()) < rtol
    return ours_idx, ours_coeffs


def test_gaussian_matches_mergekit_in_selection_order() -> None:
    points, targets = gaussian(600, 64, seed=1), gaussian(1000, 64, seed=2)
    ours_idx, _ = assert_matches_mergekit(targets, points, k=16)
    ref_idx, _ = mergekit_batch_omp(targets, points, 16)
    assert (ours_idx == ref_idx).all(dim=1).float().mean() >= 0.999


def test_correlated_anchors_match_mergekit() -> None:
    points = correlated_anchors(800, 48, seed=3)
    targets = correlated_anchors(300, 48, seed=4)
    assert_matches_mergekit(targets, points, k=24)


def test_exact_sparse_combinations_are_recovered() -> None:
    points = gaussian(500, 96, seed=5)
    generator = torch.Generator().manual_seed(6)
    support = torch.stack([torch.randperm(500, generator=generator)[:5] for _ in range(64)])
    signs = torch.randint(0, 2, (64, 5), generator=generator) * 2 - 1
    true_coeffs = signs * (1 + torch.rand(64, 5, generator=generator))
    targets = torch.einsum("bk,bkd->bd", true_coeffs, points[support])

    indices, coeffs = batch_omp(targets, points, 5)
    assert (same_support(indices, support)).all()
    order = support.argsort(dim=1)
    found = indices.argsort(dim=1)
    recovered = coeffs.gather(1, found)
    assert torch.allclose(recovered, true_coeffs.gather(1, order).float(), atol=1e-5, rtol=0)
    ref_idx, _ = mergekit_batch_omp(targets, points, 5)
    assert same_support(indices, ref_idx).all()


def test_extra_atoms_beyond_an_exact_representation_get_zero_weight() -> None:
    points = gaussian(400, 64, seed=7)
    support = torch.tensor([[3, 77, 150, 299]] * 8)
    true_coeffs = torch.tensor([[1.5, -2.0, 0.75, 1.0]] * 8)
    targets = torch.einsum("bk,bkd->bd", true_coeffs, points[support])

    indices, coeffs = batch_omp(targets, points, 10)
    assert same_support(indices[:, :4], support).all()
    assert torch.isfinite(coeffs).all()
    assert coeffs[:, 4:].abs().max() < 1e-5
    recovered = coeffs[:, :4].gather(1, indices[:, :4].argsort(dim=1))
    assert torch.allclose(recovered, true_coeffs, atol=1e-5, rtol=0)


def test_float64_matches_mergekit_exactly() -> None:
    points, targets = gaussian(400, 40, seed=8, dtype=torch.float64), gaussian(200, 40, seed=9)
    targets = targets.double()
    ours_idx, ours_coeffs = batch_omp(targets, points, 20)
    ref_idx, ref_coeffs = mergekit_batch_omp(targets, points, 20)
    assert ours_coeffs.dtype == torch.float64
    assert torch.equal(ours_idx, ref_idx)
    assert torch.allclose(ours_coeffs, ref_coeffs, rtol=1e-9, atol=1e-11)


def test_bfloat16_inputs_are_upcast_like_mergekit() -> None:
    points = gaussian(500, 64, seed=10, dtype=torch.bfloat16)
    targets = gaussian(200, 64, seed=11, dtype=torch.bfloat16)
    _, coeffs = assert_matches_mergekit(targets, points, k=12)
    assert coeffs.dtype == torch.float32


def test_low_memory_path_gives_the_same_answers() -> None:
    points, targets = gaussian(600, 64, seed=12), gaussian(200, 64, seed=13)
    plan = plan_omp(200, 600, 64, 16, torch.float32, TINY_BUDGET)
    assert plan.strategy == "residual" and plan.working_bytes <= TINY_BUDGET

    full_idx, full_coeffs = batch_omp(targets, points, 16, strategy="full_gram")
    low_idx, low_coeffs = assert_matches_mergekit(
        targets, points, k=16, memory_budget_bytes=TINY_BUDGET
    )
    assert torch.equal(low_idx, full_idx)
    assert torch.allclose(low_coeffs, full_coeffs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("strategy", "screen"),
    [("full_gram", False), ("residual", False), ("residual", True), ("int8_gram", False)],
)
def test_every_strategy_matches_mergekit_on_correlated_anchors(strategy: str, screen: bool) -> None:
    points = correlated_anchors(700, 40, seed=35)
    targets = correlated_anchors(150, 40, seed=36)
    assert_matches_mergekit(targets, points, k=20, strategy=strategy, screen=screen)


SCREENS = {
    "bfloat16": {"strategy": "residual", "screen": True},
    "int8_gram": {"strategy": "int8_gram"},
}
"""The two routes that screen with low-precision scores and decide the picks in float32."""


def screened_and_float32(
    targets: torch.Tensor, points: torch.Tensor, k: int, route: str = "bfloat16"
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    screened = batch_omp(targets, points, k, **SCREENS[route])  # type: ignore[arg-type]
    plain = batch_omp(targets, points, k, strategy="residual", screen=False)
    return screened, plain


@pytest.mark.parametrize("route", SCREENS)
def test_screening_picks_what_float32_picks_among_near_duplicates(route: str) -> None:
    # Pairs of anchors 1e-4 apart: bfloat16 (8 bits) cannot tell them apart, float32 can.
    base = gaussian(150, 48, seed=40)
    points = torch.cat([base, base + 1e-4 * gaussian(150, 48, seed=41)])
    targets = gaussian(120, 48, seed=42) + 3 * points[:120]
    (screened_idx, screened_coeffs), (plain_idx, plain_coeffs) = screened_and_float32(
        targets, points, 12, route
    )
    assert torch.equal(screened_idx, plain_idx)
    assert torch.equal(screened_coeffs, plain_coeffs)
    # The first pick is the anchor the target was built on or its twin, decided in float32.
    assert torch.isin(screened_idx[:, 0] % 150, torch.arange(120)).all()


@pytest.mark.parametrize("route", SCREENS)
def test_screening_scores_rows_at_rounding_level_in_float32(route: str) -> None:
    points = gaussian(200, 16, seed=43)
    exact = 0.5 * points[3] - 2 * points[170]  # the residual is 0 after two picks
    targets = torch.stack([torch.zeros(16), exact, gaussian(1, 16, seed=44)[0]])
    (screened_idx, screened_coeffs), (plain_idx, plain_coeffs) = screened_and_float32(
        targets, points, 6, route
    )
    assert torch.equal(screened_idx, plain_idx)
    assert torch.equal(screened_coeffs, plain_coeffs)
    assert screened_idx[0].tolist() == list(range(6))


def test_screening_bound_holds_for_every_anchor() -> None:
    """|bfloat16 score - float64 score| never exceeds the anchor's bound, even for heavy tails."""
    generator = torch.Generator().manual_seed(45)
    points = torch.randn(500, 96, generator=generator) ** 3
    residual = torch.randn(40, 96, generator=generator) ** 3 * 100
    screen = Bf16Screen(points)
    rounded = residual.to(torch.bfloat16)
    screened = (rounded @ screen.points_bf16.T)[:, :500].double()
    exact = residual.double() @ points[screen.order].double().T
    x, y, c = screen.bound_coefficients(residual, rounded, screened.abs().amax(dim=1).float())
    bound = x.unsqueeze(1) * screen.norms[:500] + y.unsqueeze(1) * screen.errors[:500]
    slack = (screened - exact).abs() / (bound + c.unsqueeze(1)).double()
    assert (slack <= 1).all()
    assert slack.max() > 0.01  # and is not vacuous
    sorted_norms = points[screen.order].norm(dim=1)
    assert (sorted_norms[:-1] >= sorted_norms[1:]).all()  # blocks hold similar norms


def test_int8_gram_rows_are_within_half_a_scale_of_float64() -> None:
    """The screen's premise: every entry of a stored row, times its scale, is within half the
    scale of G in float64, the diagonal exact; heavy tails and padding included."""
    generator = torch.Generator().manual_seed(46)
    points = torch.randn(300, 40, generator=generator) ** 3
    gram = Int8Gram(points, omp.allocate, padded=320)
    atoms = torch.tensor([0, 7, 299, 7])
    rows = torch.empty(4, 320)
    scales = gram.rows(atoms, rows, torch.empty(4, 320, dtype=torch.int8))
    exact = points[atoms].double() @ points.double().T
    error = (rows[:, :300].double() * scales.double().unsqueeze(1) - exact).abs()
    assert (error <= scales.double().unsqueeze(1) / 2 * (1 + 1e-5)).all()
    assert error.max() > 0.1 * scales.max()  # the bound is not vacuous
    assert torch.equal(rows[:, 300:], torch.zeros(4, 20))
    diagonal = rows[torch.arange(4), atoms] * scales
    assert torch.allclose(diagonal, (points[atoms] ** 2).sum(dim=1), rtol=1e-6)


def test_every_call_is_recorded_with_its_route_and_why() -> None:
    points, targets = gaussian(300, 32, seed=47), gaussian(40, 32, seed=48)
    batch_omp(targets, points, 4)  # outside a recording: nothing kept
    with recorded_calls() as calls:
        batch_omp(targets, points, 4, strategy="int8_gram")
        batch_omp(targets, points, 4)
    assert [call.plan.strategy for call in calls] == ["int8_gram", "residual"]
    forced, planned = (call.to_dict() for call in calls)
    assert forced["reason"] == "int8_gram was asked for"
    assert (forced["targets"], forced["anchors"], forced["dim"], forced["k"]) == (40, 300, 32, 4)
    assert planned["route"] == "residual" and planned["reason"].startswith("residual: the fastest")
    estimates = planned["estimated_seconds"]
    assert estimates["residual"] == min(estimates.values()) and planned["seconds"] > 0


def test_residual_chunks_fit_a_budget_too_small_for_the_gram_matrix() -> None:
    points, targets = gaussian(300, 32, seed=14), gaussian(64, 32, seed=15)
    budget = 3 * 4 * (2 * 300 + 64 + 14 * 32 + 12 * 15)  # three targets' residual state
    plan = plan_omp(64, 300, 32, 12, torch.float32, budget)
    assert (plan.strategy, plan.chunk_tokens, plan.working_bytes) == ("residual", 3, budget)
    assert_matches_mergekit(targets, points, k=12, memory_budget_bytes=budget)


def test_plan_call_is_the_plan_batch_omp_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the benchmark labels its rows with: plan_omp with the default budget and
    screening filled in, and exactly what batch_omp plans."""
    cpu = torch.device("cpu")
    screen = screens_by_default(torch.float32, 32, cpu)
    expected = plan_omp(64, 300, 32, 12, torch.float32, TINY_BUDGET, screen=screen)
    assert plan_call(64, 300, 32, 12, torch.float32, cpu, memory_budget_bytes=TINY_BUDGET) == (
        expected
    )
    assert not plan_call(64, 300, 32, 12, torch.float64, cpu).screened
    monkeypatch.setattr(omp, "default_memory_budget", lambda device: TINY_BUDGET)
    assert plan_call(64, 300, 32, 12, torch.float32, cpu) == expected

    planned: list[OmpPlan] = []

    def recording_plan_call(*args, **kwargs) -> OmpPlan:
        planned.append(plan_call(*args, **kwargs))
        return planned[-1]

    monkeypatch.setattr(omp, "plan_call", recording_plan_call)
    batch_omp(gaussian(64, 32, seed=30), gaussian(300, 32, seed=31), 12)
    assert planned == [expected]


@pytest.mark.parametrize(
    "count,cap,sizes",
    [(3131, 1024, [782, 783, 783, 783]), (50, 7, [6, 6, 6, 7, 6, 6, 6, 7]), (100, 128, [100])],
)
def test_chunks_are_as_few_and_as_even_as_the_cap_allows(count, cap, sizes) -> None:
    chunks = even_chunks(count, cap)
    assert [stop - start for start, stop in chunks] == sizes
    assert chunks[0][0] == 0 and chunks[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))


@pytest.mark.parametrize("strategy", ["residual", "int8_gram"])
def test_chunking_does_not_change_answers(strategy: str) -> None:
    """int8_gram's alpha_0 blocks span several chunks (ALPHA_0_BLOCK targets)."""
    points, targets = gaussian(300, 32, seed=16), gaussian(700, 32, seed=17)
    whole_idx, whole_coeffs = batch_omp(targets, points, 8, strategy=strategy)  # type: ignore[arg-type]
    chunked_idx, chunked_coeffs = batch_omp(
        targets,
        points,
        8,
        batch_size=7,
        strategy=strategy,  # type: ignore[arg-type]
    )
    assert torch.equal(whole_idx, chunked_idx)
    assert torch.allclose(whole_coeffs, chunked_coeffs, rtol=1e-5, atol=1e-6)


def test_k_larger_than_candidates_raises() -> None:
    with pytest.raises(ValueError, match="Cannot select 5 points from 4 candidates"):
        batch_omp(gaussian(2, 8, seed=18), gaussian(4, 8, seed=19), 5)


def test_k_equal_to_candidates_selects_every_anchor() -> None:
    points, targets = gaussian(12, 20, seed=20), gaussian(30, 20, seed=21)
    indices, coeffs = assert_matches_mergekit(targets, points, k=12)
    assert (indices.sort(dim=1).values == torch.arange(12)).all()
    least_squares = torch.linalg.lstsq(points.double().T, targets.double().T).solution.T
    assert torch.allclose(
        coeffs.double().gather(1, indices.argsort(dim=1)), least_squares, atol=1e-4
    )


@pytest.mark.parametrize("strategy", ["residual", "int8_gram"])
def test_zero_target_picks_lowest_indices_with_zero_weight_like_mergekit(strategy: str) -> None:
    points = gaussian(50, 16, seed=22)
    targets = torch.zeros(3, 16)
    indices, coeffs = batch_omp(targets, points, 6, strategy=strategy)  # type: ignore[arg-type]
    ref_idx, ref_coeffs = mergekit_batch_omp(targets, points, 6)
    assert torch.equal(indices, ref_idx)
    assert torch.equal(indices, torch.arange(6).expand(3, 6))
    assert torch.equal(coeffs, torch.zeros(3, 6))


@pytest.mark.parametrize("strategy", ["residual", "full_gram", "int8_gram"])
def test_duplicate_anchors_tie_to_the_lower_index_and_stay_finite(strategy: str) -> None:
    points = gaussian(60, 24, seed=23)
    points[40] = points[7]
    points[41] = points[7]
    targets = torch.stack([2 * points[7] + points[3], points[7], gaussian(1, 24, seed=24)[0]])
    indices, coeffs = batch_omp(targets, points, 10, strategy=strategy)  # type: ignore[arg-type]
    ref_idx, ref_coeffs = mergekit_batch_omp(targets, points, 10)
    assert torch.isfinite(coeffs).all()
    # Once a target is represented exactly, later picks are decided by rounding noise.
    assert indices[0, :2].tolist() == ref_idx[0, :2].tolist() == [7, 3]
    assert indices[1, 0] == ref_idx[1, 0] == 7
    assert torch.equal(indices[2], ref_idx[2])
    # Copies of a chosen atom add nothing: their weight goes to zero, not to +-infinity.
    copies = torch.isin(indices[:2], torch.tensor([7, 40, 41]))
    assert torch.allclose((coeffs[:2] * copies).sum(dim=1), torch.tensor([2.0, 1.0]), atol=1e-5)
    ours_rec = reconstruct(indices, coeffs, points)
    assert torch.allclose(ours_rec[:2], targets[:2].double(), atol=1e-5)
    assert torch.allclose(ours_rec[2], reconstruct(ref_idx, ref_coeffs, points)[2], atol=1e-5)


@pytest.mark.parametrize("strategy", ["residual", "int8_gram"])
def test_rank_deficient_anchors_with_k_above_the_rank_stay_finite(strategy: str) -> None:
    points = gaussian(50, 6, seed=25) @ gaussian(6, 16, seed=26)  # rank 6 in 16 dimensions
    targets = gaussian(20, 6, seed=27) @ gaussian(6, 16, seed=26)
    indices, coeffs = batch_omp(targets, points, 12, strategy=strategy)  # type: ignore[arg-type]
    assert torch.isfinite(coeffs).all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()
    ref_idx, ref_coeffs = mergekit_batch_omp(targets, points, 12)
    assert same_support(indices[:, :6], ref_idx[:, :6]).all()
    residual = (reconstruct(indices, coeffs, points) - targets.double()).norm(dim=1)
    assert (residual < 1e-4 * targets.double().norm(dim=1)).all()


def test_results_are_deterministic_and_on_the_targets_device() -> None:
    points, targets = gaussian(200, 32, seed=28), gaussian(40, 32, seed=29)
    first = batch_omp(targets, points, 8)
    second = batch_omp(targets, points, 8)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].dtype == torch.long and first[0].device == targets.device


def test_progress_bar_is_labelled(capsys: pytest.CaptureFixture[str]) -> None:
    batch_omp(gaussian(20, 16, seed=30), gaussian(40, 16, seed=31), 4, progress=True)
    assert "OMP" in capsys.readouterr().err


def test_plan_takes_the_fastest_strategy_that_fits() -> None:
    """On the reference rates (``calibrate.REFERENCE_RATES``: float32 GEMM 80 G, bfloat16 200 G
    multiply-adds/s, Gram row pass 10.9 G floats/s, as measured on the VM)."""
    big = 8 * 1024**3
    # int8 G (256 MB) is estimated cheaper than float32 G (1 GB) here; both fit.
    assert plan_omp(8192, 16000, 1024, 32, torch.float32, big).strategy == "int8_gram"
    # Beyond INT8_MAX_K atoms int8_gram's screen stops paying: float32 G is the Gram route.
    assert plan_omp(2048, 16000, 1024, 64, torch.float32, big).strategy == "full_gram"
    assert plan_omp(2048, 16000, 1024, 64, torch.float64, big).strategy == "full_gram"
    # Few targets: building G (N^2 D) costs more than B N D k.
    assert plan_omp(10, 16000, 1024, 64, torch.float32, big).strategy == "residual"
    # Small D: the memory-bound updates (B N k^2 / 2) cost more than B N D k.
    assert plan_omp(2048, 16000, 128, 64, torch.float32, big).strategy == "residual"
    # float32 G (1 GB) does not fit; the int8 one (256 MB) does and beats residual.
    assert plan_omp(2048, 16000, 1024, 32, torch.float32, 512 * 1024**2).strategy == "int8_gram"
    assert plan_omp(2048, 16000, 1024, 64, torch.float32, 512 * 1024**2).strategy == "residual"
    assert plan_omp(2048, 16000, 1024, 64, torch.float64, 512 * 1024**2).strategy == "residual"
    # G fits but leaves room for fewer than MIN_GRAM_CHUNK_TOKENS targets; int8 G does not fit.
    assert plan_omp(2048, 16000, 1024, 64, torch.float32, 100 * 1024**2).strategy == "residual"
    assert plan_omp(2048, 16000, 1024, 64, torch.float32, big, batch_size=32).chunk_tokens == 32
    # Gemma-3 <- SmolLM2 (N = 46018, D = 576, k = 64): G's rows are dearer than the GEMMs.
    # (estimates: screened residual where bfloat16 is fast, the int8 G's rows without it)
    assert plan_omp(3131, 46018, 576, 64, torch.float32, big * 2, screen=True).screened
    # bfloat16 screening makes residual cheaper than G for N = 32000, D = 1024.
    assert plan_omp(2048, 32000, 1024, 32, torch.float32, big).strategy == "int8_gram"
    screened = plan_omp(2048, 32000, 1024, 64, torch.float32, big, screen=True)
    assert screened.strategy == "residual" and screened.screened
    # Not at D = 2048, where screening does not pay.
    assert not plan_omp(8192, 16000, 2048, 64, torch.float32, big, screen=True).screened
    # SmolLM2 <- Gemma-3 (216,122 targets, k = 16, D = 640): int8_gram ran 478 tok/s against
    # screened residual's 347 and float32 residual's 126 (docs/performance.md).
    smollm_from_gemma = (216122, 46018, 640, 16, torch.float32, 3 * 1024**3)
    assert plan_omp(*smollm_from_gemma, screen=True).strategy == "int8_gram"
    assert plan_omp(*smollm_from_gemma).strategy == "int8_gram"
    # With mergekit's default k = 64 int8_gram ran 19 tok/s there, float32 residual 24 (AVX2).
    assert plan_omp(216122, 46018, 640, 64, torch.float32, 3 * 1024**3).strategy == "residual"
    # Where bfloat16 is slow (AVX2: 0.18x float32) screening is not assumed to pay.
    avx2 = REFERENCE_RATES.model_copy(update={"bfloat16_gemm": 1.45e10})
    assert (
        route_seconds(8192, 16000, 1024, 64, True, avx2)["residual"]
        == (route_seconds(8192, 16000, 1024, 64, False, avx2)["residual"])
    )
    # batch_size only lowers the strategy's own cap (128 targets for full_gram).
    assert plan_omp(2048, 16000, 1024, 64, torch.float64, big, batch_size=512).chunk_tokens == 128


def test_gram_matrix_equals_the_product_in_any_block_size() -> None:
    points = gaussian(23, 5, seed=32, dtype=torch.float64)
    assert torch.allclose(gram_matrix(points, block_rows=7), points @ points.T, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_answers() -> None:
    points, targets = gaussian(500, 64, seed=33), gaussian(100, 64, seed=34)
    cpu_idx, cpu_coeffs = batch_omp(targets, points, 16)
    for budget in (None, TINY_BUDGET):
        idx, coeffs = batch_omp(targets.cuda(), points.cuda(), 16, memory_budget_bytes=budget)
        assert idx.device.type == "cuda" and coeffs.device.type == "cuda"
        agree = same_support(idx.cpu(), cpu_idx)
        assert agree.float().mean() >= 0.99
        assert torch.allclose(coeffs.cpu()[agree], cpu_coeffs[agree], atol=1e-4)


def test_large_buffers_are_ordinary_writable_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mergekit_omp.kernels.omp.HUGEPAGE_MIN_BYTES", 0)
    points = gaussian(30, 8, seed=37)
    gram = gram_matrix(points, block_rows=4)
    assert gram.shape == (30, 30) and gram.is_contiguous()
    assert torch.allclose(gram, points @ points.T, atol=1e-5)
    _, coeffs = assert_matches_mergekit(gaussian(10, 8, seed=38), points, k=4, strategy="full_gram")
    assert torch.isfinite(coeffs).all()


@pytest.mark.parametrize("options", [{"screen": True}, {"strategy": "int8_gram"}])
def test_low_precision_screens_refuse_float64_work(options: dict) -> None:
    """Their rounding allowances are float32's."""
    targets, points = gaussian(4, 8, seed=49, dtype=torch.float64), gaussian(20, 8, seed=50)
    with pytest.raises(ValueError, match="needs float32 work"):
        batch_omp(targets, points, 3, **options)
