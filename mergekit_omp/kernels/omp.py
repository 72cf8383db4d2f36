"""Batched Orthogonal Matching Pursuit, with the anchor Gram matrix when it pays (Batch-OMP).

Same inputs, outputs and answers as ``mergekit.tokensurgeon.batch_omp``. Three strategies:

``full_gram`` (Batch-OMP; Rubinstein, Zibulevsky & Elad 2008, "Efficient Implementation of
the K-SVD Algorithm using Batch Orthogonal Matching Pursuit",
https://www.cs.technion.ac.il/~ronrubin/Publications/KSVD-OMP-v2.pdf) builds G = C C^T once
and then works in anchor space: iteration t costs N t multiply-adds per target instead of
N D, at the price of N^2 float32 memory and an N^2 D / 2 build (G is symmetric).

``residual`` works in embedding space like mergekit: every iteration multiplies the residuals
by C^T (one GEMM per chunk). It needs no Gram matrix, only O(N + k D) memory per target.
Where bfloat16 GEMMs are fast its correlations are screened in bfloat16 and only the
candidates the rounding bound cannot rule out are scored in float32 (``omp_screen``): the
same picks.

``int8_gram`` keeps residual's embedding-space residuals and screens alpha_t = C x - G[S]^T
gamma from G stored in int8 (N^2 bytes, a quarter of full_gram's), scoring in float32 only
the anchors its quantization bound cannot rule out (``omp_int8_gram``): the same picks, one
GEMM per target instead of k, and t Gram rows per iteration, bound by memory bandwidth
rather than arithmetic. It is the route that pays on CPUs without fast bfloat16 (AVX2),
where the targets far outnumber the anchors.

Notation, per target x (D) and anchors C (N x D):
    alpha = C r          correlations of the anchors with the residual r
    q_t                  t-th orthonormal direction (Gram-Schmidt of the selected atoms)
    w_s = <q_s, a_j>     the new atom a_j's components along the old directions
    d_t                  norm of a_j's component orthogonal to q_0..q_{t-1}
    v_t = d_t C q_t      the new atom's Gram row with the old directions projected out
    z_t = <q_t, x>       so that r_t = r_{t-1} - z_t q_t and alpha_t = alpha_{t-1} - z_t C q_t
    L                    lower-triangular with L[t, s] = w_s and L[t, t] = d_t, i.e. the
                         transpose of mergekit's R (the Cholesky factor of G[I, I])
The coefficients are then L^T c = z, exactly what mergekit solves as R c = Q^T x.

The plan (``plan_omp``) takes the fastest strategy that fits the memory budget, by
``route_seconds``: estimated seconds from this machine's measured rates
(``calibrate.machine_rates``: float32 and bfloat16 GEMM, the Gram row pass) and per-strategy
counts of multiply-adds and passes. full_gram's update-loop constants (``MEMORY_BOUND_COST``,
``MEMORY_BOUND_CACHED_POINTS``, ``GRAM_PASSES_PER_ITERATION``, ``GRAM_TOUCH_COST``) and the
screen's ``SCREEN_SPEEDUPS`` were fitted on a 2-core AMD EPYC VM (AVX-512 with AVX-512
BF16, torch 2.13.0+cpu with 2 threads) relative to its float32 GEMM rate; they only decide
which strategy runs, never the answers. ``python benchmarks/omp_speed.py`` times the
strategies on given shapes (docs/performance.md, "Refitting the cost model"); the plan
tests in tests/test_omp.py pin the plans of the measured shapes. Every call made inside
``recorded_calls()`` is kept with its plan and why (the report's ``omp`` section).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm import tqdm

from mergekit_omp.kernels.calibrate import REFERENCE_RATES, MachineRates, machine_rates
from mergekit_omp.kernels.omp_int8_gram import BOUND_SAFETY, ROUNDING_SLACK, Int8Gram
from mergekit_omp.kernels.omp_screen import (
    GEMM_ROW_ALIGN,
    Bf16Screen,
    aligned_rows,
    bf16_matmul_is_fast,
    padded_anchor_count,
)

LOG = logging.getLogger(__name__)

DEFAULT_MEMORY_FRACTION = 0.5
"""Most of the currently available memory (RAM, or free memory of the GPU) used by default."""

MIN_DEFAULT_BUDGET_BYTES = 1024**3
DEFAULT_BUDGET_INPUTS = 4
"""The default budget is this many times OMP's own inputs' size (targets and anchors in the
work dtype), at least ``MIN_DEFAULT_BUDGET_BYTES``: a ceiling, within which the fastest
strategy runs. It holds int8_gram's N^2-byte Gram matrix where the targets outnumber the
anchors (2.6 GB for SmolLM2-135M <- Gemma-3's 216,122 targets and 46,018 anchors, inputs
0.67 GB); float32 G (8.5 GB there) needs ``-p memory_gb=``."""

FALLBACK_MEMORY_BUDGET_BYTES = 4 * 1024**3
"""Budget used when the available memory cannot be queried."""

MAX_CHUNK_TOKENS = {"full_gram": 128, "residual": 1024, "int8_gram": 64}
"""Upper bound on targets processed together. full_gram's per-iteration Python work is
shared by the chunk (100, 123, 132 and 147 tok/s with chunks of 16, 32, 64 and 128 at
N = 16,000, D = 2048); residual's GEMM is more efficient on more rows (125 GFLOP/s with 256
rows, 150 with 1024, at N = 46,000, D = 576)."""

MIN_INT8_CHUNK_TOKENS = 16
"""int8_gram is only planned if the budget leaves room for this many targets' state next to
its G (per-iteration overhead dominates smaller chunks: 410 tok/s with 16, 478 with 64 at
N = 46,018, D = 640, k = 16)."""

INT8_PASSES_PER_ITERATION = 12.0
"""Row-pass elements per anchor per int8_gram iteration besides the t Gram rows it combines
(alpha_0's copy, amax, amin, the new row's gather and conversion, the Python overhead).
Fitted on the calibration VM (SmolLM2 <- Gemma-3's problem, N = 46,018, D = 640, k = 16,
``benchmarks/omp_real.py``) so that int8_gram's estimate errs as residual's does (both about
0.66 of the measured seconds): 412 tok/s plus 27 s for G, against screened residual's 349 and
float32 residual's 119."""

INT8_MAX_K = 32
"""int8_gram is only planned for k up to this. Its screen's bound (the sum of |gamma_s| scale_s
/ 2 over the t chosen atoms) grows with t while the best score shrinks with the residual, so
late iterations rule out few anchors and fall back to exact correlations on top of their t
row passes: on the real pair (AVX2) int8_gram ran 4.4x float32 residual at k = 16 and 3.2x at
k = 32, but 0.8x and 0.6x at k = 64 in the two directions (performance.md), which its estimate
does not model."""

INT8_BUILD_PASSES = 12.0
"""Row-pass elements per entry of G while int8_gram builds and quantizes it (fitted with
``INT8_PASSES_PER_ITERATION``)."""

REFERENCE_BF16_RATIO = 2.5
"""bfloat16/float32 GEMM rate ratio of the VM ``SCREEN_SPEEDUPS`` were measured on."""

MIN_GRAM_CHUNK_TOKENS = 8
"""full_gram is only planned if the budget leaves room for this many targets' state next
to G: smaller chunks make its per-iteration work overhead-bound (58 tok/s with 1 target per
chunk, 96 with 8, at N = 16,000 and D = 2048)."""

MEMORY_BOUND_COST = 12.0
"""Cost of one multiply-add of full_gram's update loop (per target N k^2 / 2 of them over
the stored v rows, plus ``GRAM_PASSES_PER_ITERATION`` elementwise passes over N per
iteration) relative to one float32 GEMM multiply-add, up to ``MEMORY_BOUND_CACHED_POINTS``
anchors. On the calibration VM (module docstring), against float32 residual's 75 GMAC/s:
12.8 at N = 16,000 and 12.7 at N = 32,000 (k = 64, D = 1024), 14.1 at N = 46,018 (k = 16,
D = 640), 22.6 at N = 46,018 (k = 64, D = 576) as a chunk's rows fall out of cache; see
``memory_bound_cost``."""

GRAM_PASSES_PER_ITERATION = 5
"""Elementwise passes over a target's N correlations per full_gram iteration besides the
t passes over v (the alpha update, |alpha|, the selected atoms' -inf, two argmax levels):
with them one cost per multiply-add fits both k = 16 and k = 64."""

MEMORY_BOUND_CACHED_POINTS = 16000
"""Anchors up to which a chunk's update rows stay in the CPU's cache (32 MB on the
calibration VM)."""

SCREEN_MAX_DIM = 1024
"""residual screens its correlations in bfloat16 by default up to this dimension. The
rounding bound widens with sqrt(D) relative to the top scores, so the candidates to check
grow with D; see ``SCREEN_SPEEDUPS``."""

SCREEN_SPEEDUPS = ((640, 2.7), (1024, 2.3), (1536, 1.6))
"""Speed of screened residual relative to float32 residual in the cost model, for D up to
each bound (1 above the last): the lowest measured in each range on the calibration VM. Real
SmolLM2 rows: 3.0x (N = 46,018, D = 576, k = 64), Gemma-3 rows: 2.75x (N = 46,018, D = 640,
k = 16); Gaussian: 2.33x (N = 16,000) and 3.52x (N = 32,000) at D = 1024, 1.68x at
D = 1536 (N = 16,000, k = 64)."""

GRAM_TOUCH_COST = 400.0
"""Extra cost per entry of G, in GEMM multiply-adds, of mapping fresh memory for it (on the
calibration VM the first write to 8.5 GB costs 9 to 15 s, as long as a 400-deep GEMM)."""

ALPHA_0_BLOCK = 512
"""Targets whose alpha_0 = C x int8_gram computes in one GEMM (188 MB at N = 46,018)."""

ARGMAX_BLOCK = 64
"""Columns per block in the two-level argmax over the anchors."""

GRAM_BLOCK_ROWS = 2048
"""Rows of the Gram matrix computed per GEMM."""

HUGEPAGE_MIN_BYTES = 256 * 1024**2
"""CPU buffers at least this large are mapped with huge pages (see ``allocate``)."""

DEPENDENCE_TOLERANCE_ULPS = 64
"""An atom whose orthogonal part has squared norm below this many machine epsilons of its
squared norm is treated as linearly dependent on the atoms already chosen."""

Strategy = Literal["full_gram", "residual", "int8_gram"]


@dataclass(frozen=True)
class OmpPlan:
    """How a call is executed: which strategy, and how many targets per chunk."""

    strategy: Strategy
    chunk_tokens: int
    working_bytes: int
    """Memory the plan allocates: G (full_gram, int8_gram) plus one chunk's state."""
    screened: bool = False
    """residual only: correlations screened by a bfloat16 GEMM (see ``omp_screen``)."""
    budget_bytes: int = 0
    estimated_seconds: tuple[tuple[str, float], ...] = ()
    """``route_seconds`` of the strategies that fit the budget, the chosen one among them;
    all three when the strategy was forced."""
    forced: bool = False

    def reason(self) -> str:
        """Why this strategy ran, in one line."""
        if self.forced:
            return f"{self.strategy} was asked for"
        estimates = ", ".join(f"{name} {seconds:.3g} s" for name, seconds in self.estimated_seconds)
        return (
            f"{self.strategy}: the fastest estimate ({estimates}) of those that fit "
            f"{self.budget_bytes / 1e9:.2f} GB"
        )


@dataclass(frozen=True)
class OmpCall:
    """One ``batch_omp`` call as it ran (see ``recorded_calls``)."""

    targets: int
    anchors: int
    dim: int
    k: int
    plan: OmpPlan
    seconds: float
    setup_seconds: float = 0.0
    """Of ``seconds``, building the strategy's shared state (G, the bfloat16 anchors)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": self.targets,
            "anchors": self.anchors,
            "dim": self.dim,
            "k": self.k,
            "route": self.plan.strategy,
            "screened": self.plan.screened,
            "chunk_tokens": self.plan.chunk_tokens,
            "working_bytes": self.plan.working_bytes,
            "budget_bytes": self.plan.budget_bytes,
            "estimated_seconds": dict(self.plan.estimated_seconds),
            "reason": self.plan.reason(),
            "seconds": round(self.seconds, 3),
            "setup_seconds": round(self.setup_seconds, 3),
        }


_RECORDED: ContextVar[list[OmpCall] | None] = ContextVar("omp_calls", default=None)


@contextmanager
def recorded_calls() -> Iterator[list[OmpCall]]:
    """Collect every ``batch_omp`` call made inside the block (for the report)."""
    calls: list[OmpCall] = []
    token = _RECORDED.set(calls)
    try:
        yield calls
    finally:
        _RECORDED.reset(token)


def batch_omp(
    targets: torch.Tensor,
    candidate_points: torch.Tensor,
    k: int,
    eps: float = 1e-8,
    *,
    memory_budget_bytes: int | None = None,
    batch_size: int | None = None,
    strategy: Strategy | None = None,
    screen: bool | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``k`` of ``candidate_points`` (N, D) that best approximate each row of ``targets``.

    A drop-in replacement for ``mergekit.tokensurgeon.batch_omp``: returns the selected
    indices (B, k) in selection order and their least-squares coefficients (B, k) in the work
    dtype (float64 when ``targets`` is float64, float32 otherwise).

    Args:
        targets: (B, D) vectors to approximate.
        candidate_points: (N, D) anchor vectors (the dictionary).
        k: atoms per target; must not exceed N.
        eps: norms of orthogonalised atoms below this count as zero, as in mergekit.
        memory_budget_bytes: working memory allowed for the Gram matrix and the per-chunk
            state; defaults to ``DEFAULT_BUDGET_INPUTS`` times the size of the inputs (at
            least 1 GiB), within ``DEFAULT_MEMORY_FRACTION`` of the available memory
            (``plan_call``).
        batch_size: at most this many targets per chunk (default ``MAX_CHUNK_TOKENS``);
            chunks are smaller when the budget requires.
        strategy: force ``full_gram``, ``int8_gram`` (float32 work only) or ``residual``
            instead of planning (for tests and benchmarks; the Gram matrix is allocated
            whatever the budget then).
        screen: let residual screen its correlations with a bfloat16 GEMM and recompute the
            candidates in float32 (same picks); default: for float32 work with D up to
            ``SCREEN_MAX_DIM`` where bfloat16 GEMMs are fast (CUDA, or a CPU whose
            calibration measured them at least 1.5x float32's: ``kernels/calibrate.py``).
        progress: show a tqdm bar over the targets.
    """
    if targets.ndim != 2 or candidate_points.ndim != 2:
        raise ValueError("targets and candidate_points must be 2-D (B, D) and (N, D)")
    num_targets, dim = targets.shape
    num_points = candidate_points.shape[0]
    if candidate_points.shape[1] != dim:
        raise ValueError(
            f"targets have dimension {dim} but candidate points have {candidate_points.shape[1]}"
        )
    if k > num_points:
        raise ValueError(f"Cannot select {k} points from {num_points} candidates")
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    device = targets.device
    work_dtype = targets.dtype if targets.dtype in (torch.float32, torch.float64) else torch.float32
    indices = torch.zeros((num_targets, k), dtype=torch.long, device=device)
    coeffs = torch.zeros((num_targets, k), dtype=work_dtype, device=device)
    if num_targets == 0 or k == 0:
        return indices, coeffs

    if screen and work_dtype != torch.float32:
        raise ValueError("bfloat16 screening needs float32 work (targets are float64)")
    if strategy == "int8_gram" and work_dtype != torch.float32:
        raise ValueError("int8_gram needs float32 work (targets are float64)")
    started = time.perf_counter()
    targets_work = targets.to(dtype=work_dtype)
    points = candidate_points.to(device=device, dtype=work_dtype)
    plan = plan_call(
        num_targets,
        num_points,
        dim,
        k,
        work_dtype,
        device,
        memory_budget_bytes=memory_budget_bytes,
        batch_size=batch_size,
        strategy=strategy,
        screen=screen,
    )
    LOG.debug("batch_omp plan: %s (B=%d, N=%d, D=%d, k=%d)", plan, num_targets, num_points, dim, k)

    setup_started = time.perf_counter()
    solver = make_solver(points, plan, targets_work)
    setup_seconds = time.perf_counter() - setup_started
    state = _ChunkState(plan, num_points, dim, k, targets_work)
    with tqdm(total=num_targets, desc="OMP", unit="tok", disable=not progress) as bar:
        for start, stop in even_chunks(num_targets, plan.chunk_tokens):
            chunk_indices, chunk_coeffs = _omp_chunk(
                targets_work, start, stop, k, eps, solver, state
            )
            indices[start:stop] = chunk_indices
            coeffs[start:stop] = chunk_coeffs
            bar.update(stop - start)
    del solver, state
    release_freed_memory(device)
    recorded = _RECORDED.get()
    if recorded is not None:
        seconds = time.perf_counter() - started
        recorded.append(OmpCall(num_targets, num_points, dim, k, plan, seconds, setup_seconds))
    return indices, coeffs


def make_solver(
    points: torch.Tensor, plan: OmpPlan, targets: torch.Tensor
) -> _GramSolver | _ResidualSolver | _Int8GramSolver:
    """The solver that runs ``plan``'s strategy on ``targets``' chunks."""
    if plan.strategy == "full_gram":
        return _GramSolver(points)
    if plan.strategy == "int8_gram":
        return _Int8GramSolver(points, plan, targets)
    return _ResidualSolver(points, plan)


def even_chunks(num_targets: int, cap: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest chunks of at most ``cap`` targets, their sizes within one
    of each other: a small last chunk would run its k GEMMs on few rows, at a fraction of
    the GEMM's speed (3,131 targets in chunks of 1024 would leave 59)."""
    count = -(-num_targets // cap)
    bounds = [num_targets * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def plan_call(
    num_targets: int,
    num_points: int,
    dim: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    memory_budget_bytes: int | None = None,
    batch_size: int | None = None,
    strategy: Strategy | None = None,
    screen: bool | None = None,
) -> OmpPlan:
    """The plan ``batch_omp`` runs with these arguments: ``plan_omp`` with the default
    budget, screening (``screens_by_default``) and this machine's rates
    (``calibrate.machine_rates``) filled in. The default budget is ``DEFAULT_BUDGET_INPUTS``
    times the size of OMP's inputs (at least ``MIN_DEFAULT_BUDGET_BYTES``), within
    ``default_memory_budget``."""
    budget = memory_budget_bytes
    if budget is None:
        inputs = (num_targets + num_points) * dim * (torch.finfo(dtype).bits // 8)
        ceiling = max(MIN_DEFAULT_BUDGET_BYTES, DEFAULT_BUDGET_INPUTS * inputs)
        budget = min(default_memory_budget(device), ceiling)
    if screen is None:
        screen = screens_by_default(dtype, dim, device)
    rates = machine_rates(device)
    return plan_omp(
        num_targets, num_points, dim, k, dtype, budget, batch_size, strategy, screen, rates
    )


def screens_by_default(dtype: torch.dtype, dim: int, device: torch.device) -> bool:
    """Whether residual screens in bfloat16 unless told: float32 work, D up to
    ``SCREEN_MAX_DIM``, and a device where bfloat16 GEMMs are fast."""
    return dtype == torch.float32 and dim <= SCREEN_MAX_DIM and bf16_matmul_is_fast(device.type)


def release_freed_memory(device: torch.device) -> None:
    """Give the heap memory freed by the OMP loop back to the OS (glibc ``malloc_trim``).

    Its many medium-sized temporaries come from the heap, which glibc does not shrink by
    itself; without this the freed pages count in the process's peak memory until exit
    (about 0.08 GiB on a Gemma-3 <- SmolLM2 transplant).
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_memory_budget(device: torch.device) -> int:
    """``DEFAULT_MEMORY_FRACTION`` of the memory currently available on ``device``."""
    available: int | None = None
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        try:
            import psutil

            available = psutil.virtual_memory().available
        except ImportError:
            available = None
    if available is None:
        return FALLBACK_MEMORY_BUDGET_BYTES
    return int(available * DEFAULT_MEMORY_FRACTION)


def plan_omp(
    num_targets: int,
    num_points: int,
    dim: int,
    k: int,
    dtype: torch.dtype,
    memory_budget_bytes: int,
    batch_size: int | None = None,
    strategy: Strategy | None = None,
    screen: bool = False,
    rates: MachineRates = REFERENCE_RATES,
) -> OmpPlan:
    """Choose the strategy and chunk size from the shapes, the memory budget and the
    machine's measured ``rates``: the fastest by ``route_seconds`` among the strategies that
    fit the budget (residual always runs).

    Chunks are as large as the budget allows, up to ``batch_size`` (or ``MAX_CHUNK_TOKENS``).
    ``full_gram`` must fit next to at least ``MIN_GRAM_CHUNK_TOKENS`` targets' state,
    ``int8_gram`` next to ``MIN_INT8_CHUNK_TOKENS``; ``int8_gram`` needs float32 work (its
    rounding allowance is float32's) and k >= 2.
    """
    item = torch.finfo(dtype).bits // 8
    padded = padded_count(num_points)
    per_target = {
        # k rows of v, alpha, |alpha| (padded), two rows of slack for temporaries, and the
        # small k x k factors.
        "full_gram": ((k + 4) * num_points + k * (k + 3)) * item,
        # alpha, |alpha| (padded), the k directions, the residual and the k x k factors.
        "residual": (2 * num_points + ARGMAX_BLOCK + (k + 2) * dim + k * (k + 3)) * item,
    }
    # residual's state, screened alpha, the k - 1 Gram rows and their int8 staging row.
    per_target["int8_gram"] = per_target["residual"] + (k + 1) * padded * item + padded
    fixed = {
        "full_gram": num_points * num_points * item,
        "residual": 0,
        # G in int8, its scales, diagonal and the norms, the padded anchors, alpha_0's block
        "int8_gram": num_points * padded
        + 3 * num_points * item
        + padded * dim * item
        + min(num_targets, ALPHA_0_BLOCK + MAX_CHUNK_TOKENS["int8_gram"]) * padded * item,
    }
    if screen:
        # bfloat16 scores; alpha and |alpha| stay reserved for rows scored in float32.
        padded_screen = padded_anchor_count(num_points)
        per_target["residual"] += padded_screen * 2
        # the anchors in bfloat16, and up to GEMM_ROW_ALIGN - 1 rows of padding scores
        fixed["residual"] = padded_screen * dim * 2 + (GEMM_ROW_ALIGN - 1) * padded_screen * 2

    seconds = route_seconds(num_targets, num_points, dim, k, screen, rates)

    def make(name: Strategy, considered: list[Strategy]) -> OmpPlan:
        room = (memory_budget_bytes - fixed[name]) // per_target[name]
        cap = min(num_targets, MAX_CHUNK_TOKENS[name], batch_size or num_targets)
        chunk = max(1, min(cap, room))
        return OmpPlan(
            name,
            chunk,
            fixed[name] + chunk * per_target[name],
            screened=screen and name == "residual",
            budget_bytes=memory_budget_bytes,
            estimated_seconds=tuple(
                (other, float(f"{seconds[other]:.4g}")) for other in considered
            ),
            forced=strategy is not None,
        )

    if strategy is not None:
        return make(strategy, ["residual", "full_gram", "int8_gram"])
    least_chunk = {"full_gram": MIN_GRAM_CHUNK_TOKENS, "int8_gram": MIN_INT8_CHUNK_TOKENS}
    gram_strategies: tuple[Strategy, ...] = ("full_gram", "int8_gram")
    fitting: list[Strategy] = ["residual"]
    for name in gram_strategies:
        room = (memory_budget_bytes - fixed[name]) // per_target[name]
        if room >= min(num_targets, least_chunk[name]):
            fitting.append(name)
    if dtype != torch.float32 or not 2 <= k <= INT8_MAX_K:
        fitting = [name for name in fitting if name != "int8_gram"]
    return make(min(fitting, key=lambda name: seconds[name]), fitting)


def route_seconds(
    num_targets: int, num_points: int, dim: int, k: int, screen: bool, rates: MachineRates
) -> dict[Strategy, float]:
    """Estimated seconds of each strategy on a machine with ``rates``.

    residual: B N D k GEMM multiply-adds (``screen_speedup`` times faster when screened,
    scaled by how this machine's bfloat16/float32 ratio compares with the one it was
    measured at). full_gram: N^2 (D / 2 + ``GRAM_TOUCH_COST``) for G plus
    ``memory_bound_cost(N)`` x B N (k^2 / 2 + ``GRAM_PASSES_PER_ITERATION`` k) for the
    updates, in GEMM multiply-adds. int8_gram: N^2 D + B N D GEMM multiply-adds (G and
    alpha_0), plus N^2 ``INT8_BUILD_PASSES`` and B N (k (k - 1) / 2 +
    ``INT8_PASSES_PER_ITERATION`` k) row-pass elements (``MachineRates.gram_row_pass``).
    """
    gemm = rates.float32_gemm
    speedup = 1.0
    if screen:
        bf16_ratio = rates.bfloat16_gemm / rates.float32_gemm
        speedup = max(1.0, screen_speedup(dim) * min(1.0, bf16_ratio / REFERENCE_BF16_RATIO))
    update = num_targets * num_points * (k * k / 2 + GRAM_PASSES_PER_ITERATION * k)
    gram = (
        num_points * num_points * (dim / 2 + GRAM_TOUCH_COST)
        + memory_bound_cost(num_points) * update
    )
    int8_gemm = (num_points + num_targets) * num_points * dim
    int8_passes = num_points * num_points * INT8_BUILD_PASSES + num_targets * num_points * (
        k * (k - 1) / 2 + INT8_PASSES_PER_ITERATION * k
    )
    return {
        "residual": num_targets * num_points * dim * k / gemm / speedup,
        "full_gram": gram / gemm,
        "int8_gram": int8_gemm / gemm + int8_passes / rates.gram_row_pass,
    }


def screen_speedup(dim: int) -> float:
    """``SCREEN_SPEEDUPS`` for dimension ``dim``."""
    return next((speedup for bound, speedup in SCREEN_SPEEDUPS if dim <= bound), 1.0)


def memory_bound_cost(num_points: int) -> float:
    """``MEMORY_BOUND_COST``, growing like sqrt(N) beyond ``MEMORY_BOUND_CACHED_POINTS``
    (12, 17 and 20 at N = 16,000, 32,000 and 46,000: at or above the measured costs)."""
    return MEMORY_BOUND_COST * math.sqrt(max(1.0, num_points / MEMORY_BOUND_CACHED_POINTS))


def gram_matrix(points: torch.Tensor, block_rows: int = GRAM_BLOCK_ROWS) -> torch.Tensor:
    """G = points @ points.T, symmetric by construction.

    Each block of rows is computed from the diagonal rightwards straight into G's memory and
    mirrored below the diagonal: half the multiply-adds, for a transposed copy (4.8 s against
    7.7 s for the full product at N = 16,000, D = 2048 on the calibration VM).
    """
    num_points = points.shape[0]
    gram = allocate((num_points, num_points), points)
    for start in range(0, num_points, block_rows):
        stop = min(start + block_rows, num_points)
        torch.matmul(points[start:stop], points[start:].T, out=gram[start:stop, start:])
        gram[stop:, start:stop].copy_(gram[start:stop, stop:].T)
    return gram


def allocate(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor; large CPU ones on transparent huge pages where Linux allows.

    The first write to freshly mapped memory costs a page fault per 4 KiB page, which for a
    multi-GB Gram matrix takes as long as computing it (15 s for 8.5 GB on the calibration
    VM, 9 s with huge pages). ``madvise(MADV_HUGEPAGE)`` asks for 2 MiB pages instead.
    """
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    hugepage = getattr(mmap, "MADV_HUGEPAGE", None)
    if like.device.type != "cpu" or nbytes < HUGEPAGE_MIN_BYTES or hugepage is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(hugepage)
    return torch.frombuffer(buffer, dtype=like.dtype).view(shape)


def padded_count(num_points: int) -> int:
    """``num_points`` rounded up to whole ``ARGMAX_BLOCK``s."""
    return -(-num_points // ARGMAX_BLOCK) * ARGMAX_BLOCK


def alpha_0_rows(chunk: int, num_targets: int) -> int:
    """Rows of int8_gram's alpha_0 block: ``ALPHA_0_BLOCK`` rounded up to whole chunks."""
    return min(num_targets, -(-ALPHA_0_BLOCK // chunk) * chunk + chunk)


class _ChunkState:
    """Buffers for one chunk of targets, allocated once per call and reused by every chunk."""

    def __init__(self, plan: OmpPlan, num_points: int, dim: int, k: int, like: torch.Tensor):
        chunk = plan.chunk_tokens
        options: dict[str, Any] = {"dtype": like.dtype, "device": like.device}
        if plan.screened:
            self.screen_scores = torch.empty(
                (aligned_rows(chunk), padded_anchor_count(num_points)),
                dtype=torch.bfloat16,
                device=like.device,
            )
        else:
            self.alpha = torch.empty((chunk, num_points), **options)
            self.scores = _scores_buffer(chunk, num_points, like)
        self.selected = torch.zeros((chunk, k), dtype=torch.long, device=like.device)
        self.lower = torch.empty((chunk, k, k), **options)
        self.z = torch.empty((chunk, k), **options)
        if plan.strategy == "int8_gram":
            padded = padded_count(num_points)
            self.alpha_0 = torch.empty((alpha_0_rows(chunk, like.shape[0]), padded), **options)
            self.screened = torch.empty((chunk, padded), **options)
            self.gram_rows = torch.empty((chunk, max(k - 1, 0), padded), **options)
            self.row_bytes = torch.empty((chunk, padded), dtype=torch.int8, device=like.device)
            self.row_scales = torch.empty((chunk, max(k - 1, 0)), **options)
        if plan.strategy == "full_gram":
            # v[t, b] is target b's v_t; v[t] is complete before iteration t + 1 reads it.
            self.v = allocate((k, chunk, num_points), like)
            self.inv_d = torch.empty((chunk, k), **options)
        else:
            # directions[s, b] is target b's q_s: project() streams over s (see there).
            self.directions = torch.empty((k, chunk, dim), **options)
            self.projections = torch.empty((k, chunk), **options)
            self.residual = torch.empty((chunk, dim), **options)


class _GramSolver:
    """Batch-OMP through G: alpha is updated with v_t = G[j] - sum_s w_s v_s / d_s."""

    def __init__(self, points: torch.Tensor) -> None:
        start = time.perf_counter()
        self.points = points
        self.gram = gram_matrix(points)
        LOG.debug(
            "built the %s Gram matrix in %.3f s",
            tuple(self.gram.shape),
            time.perf_counter() - start,
        )

    def begin(self, targets: torch.Tensor, start: int, state: _ChunkState) -> None:
        b = targets.shape[0]
        self.alpha, self.v, self.inv_d = state.alpha[:b], state.v[:, :b], state.inv_d[:b]
        self.scores = state.scores[:b]
        torch.matmul(targets, self.points.T, out=self.alpha)

    def pick(self, selected: torch.Tensor) -> torch.Tensor:
        """alpha already holds C r_t: advance() updated it."""
        return _pick_atoms(self.alpha, self.scores, selected)

    def project(self, t: int, atom: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = atom.shape[0]
        v, v_t = self.v, self.v[t]
        torch.index_select(self.gram, 0, atom, out=v_t)
        norm_squared = v_t.gather(1, atom.unsqueeze(1)).squeeze(1)
        # w[s] = <q_s, a_j> = v_s[j] / d_s, and v_t = G[j] - sum_s w[s] v_s / d_s.
        w = v[:t].gather(2, atom.view(1, b, 1).expand(t, b, 1)).squeeze(2).T * self.inv_d[:, :t]
        # One pass per s over the chunk's (b, N) rows: v_t stays in cache while the v_s stream
        # past it (1.6x faster than a batched matrix-vector product at N = 16,000).
        weights = w * self.inv_d[:, :t]
        for s in range(t):
            v_t.addcmul_(v[s], weights[:, s : s + 1], value=-1)
        return w, norm_squared, norm_squared - (w * w).sum(dim=1)

    def advance(self, t: int, atom: torch.Tensor, inv_d: torch.Tensor) -> torch.Tensor:
        # z_t = <q_t, x> = <a_j, r_{t-1}> / d = alpha[j] / d; then alpha -= z_t v_t / d.
        self.inv_d[:, t] = inv_d
        z = self.alpha.gather(1, atom.unsqueeze(1)).squeeze(1) * inv_d
        self.alpha.addcmul_(self.v[t], (z * inv_d).unsqueeze(1), value=-1)
        return z


class _ResidualSolver:
    """OMP in embedding space, as mergekit does it: alpha = r_t C^T by one GEMM per step."""

    def __init__(self, points: torch.Tensor, plan: OmpPlan) -> None:
        self.points = points
        self.screen = Bf16Screen(points) if plan.screened else None

    def begin(self, targets: torch.Tensor, start: int, state: _ChunkState) -> None:
        b = targets.shape[0]
        self.targets = targets
        self.directions, self.residual = state.directions[:, :b], state.residual[:b]
        self.projections = state.projections[:, :b]
        if self.screen is None:
            self.alpha, self.scores = state.alpha[:b], state.scores[:b]
        else:
            self.screen_scores = state.screen_scores[: aligned_rows(b)]
        self.residual.copy_(targets)

    def pick(self, selected: torch.Tensor) -> torch.Tensor:
        if self.screen is None:
            torch.matmul(self.residual, self.points.T, out=self.alpha)
            return _pick_atoms(self.alpha, self.scores, selected)
        atoms, undecided = self.screen.pick(self.residual, selected, self.screen_scores)
        if undecided.numel() > 0:
            alpha = self.residual[undecided] @ self.points.T
            scores = _scores_buffer(undecided.numel(), alpha.shape[1], alpha)
            atoms[undecided] = _pick_atoms(alpha, scores, selected[undecided])
        return atoms

    def project(self, t: int, atom: torch.Tensor) -> tuple[torch.Tensor, ...]:
        atoms = self.points.index_select(0, atom)
        # Classical Gram-Schmidt, one pass per s over the chunk's (b, D) rows of q_s: 1.6x
        # faster than batched matrix-vector products (b small products each) at t = 32.
        w = self.projections[:t]
        for s in range(t):
            torch.linalg.vecdot(self.directions[s], atoms, out=w[s])
        self.orthogonal = atoms.clone()
        for s in range(t):
            self.orthogonal.addcmul_(self.directions[s], w[s].unsqueeze(1), value=-1)
        w = w.T
        d_squared = (self.orthogonal * self.orthogonal).sum(dim=1)
        return w, (atoms * atoms).sum(dim=1), d_squared

    def advance(self, t: int, atom: torch.Tensor, inv_d: torch.Tensor) -> torch.Tensor:
        direction = self.directions[t]
        torch.mul(self.orthogonal, inv_d.unsqueeze(1), out=direction)
        z = (direction * self.targets).sum(dim=1)
        self.residual.addcmul_(direction, z.unsqueeze(1), value=-1)
        return z


class _Int8GramSolver(_ResidualSolver):
    """residual's Gram-Schmidt in embedding space, with alpha_t screened from int8 rows of G
    (``omp_int8_gram``) instead of a GEMM per iteration.

    Rows are padded with zeros to whole ``ARGMAX_BLOCK``s, so the block maxima and minima of
    alpha~ come from one pass (``aminmax``) without a separate |alpha~|.
    """

    def __init__(self, points: torch.Tensor, plan: OmpPlan, targets: torch.Tensor) -> None:
        super().__init__(points, plan)
        num_points, dim = points.shape
        self.all_targets = targets
        self.block_start = self.block_stop = 0
        self.padded_points = torch.zeros(
            (padded_count(num_points), dim), dtype=points.dtype, device=points.device
        )
        self.padded_points[:num_points] = points
        self.gram = Int8Gram(points, allocate, padded_count(num_points))
        LOG.debug("built the int8 Gram matrix in %.3f s", self.gram.seconds)
        self.norms = points.norm(dim=1)
        self.max_norm = self.norms.max()
        self.fallback_blocks = padded_count(num_points) // ARGMAX_BLOCK // 2

    def begin(self, targets: torch.Tensor, start: int, state: _ChunkState) -> None:
        super().begin(targets, start, state)
        b = targets.shape[0]
        if not self.block_start <= start < start + b <= self.block_stop:
            # alpha_0 = C x for the next ALPHA_0_BLOCK targets in one GEMM: it runs at a third
            # of the speed on a chunk's 64 rows.
            self.block_start = start
            self.block_stop = min(start + state.alpha_0.shape[0], self.all_targets.shape[0])
            torch.matmul(
                self.all_targets[start : self.block_stop],
                self.padded_points.T,
                out=state.alpha_0[: self.block_stop - start],
            )
        self.alpha_0 = state.alpha_0[start - self.block_start :][:b]
        self.screened = state.screened[:b]
        self.rows, self.row_bytes = state.gram_rows[:b], state.row_bytes[:b]
        self.scales, self.lower, self.z = state.row_scales[:b], state.lower[:b], state.z[:b]
        self.target_norms = targets.norm(dim=1)

    def pick(self, selected: torch.Tensor) -> torch.Tensor:
        t = selected.shape[1]
        num_points = self.points.shape[0]
        if t == 0:
            return _pick_atoms(self.alpha_0[:, :num_points], self.scores, selected)
        b = selected.shape[0]
        gamma = torch.linalg.solve_triangular(
            self.lower[:, :t, :t].transpose(1, 2), self.z[:, :t].unsqueeze(-1), upper=True
        ).squeeze(-1)
        alpha = self.screened
        # The rows hold G's int8 values: their scales go with gamma.
        torch.baddbmm(
            self.alpha_0.unsqueeze(1),
            (gamma * self.scales[:, :t]).unsqueeze(1),
            self.rows[:, :t],
            alpha=-1,
            out=alpha.unsqueeze(1),
        )
        weights = gamma.abs()
        bound = BOUND_SAFETY / 2 * (weights * self.scales[:, :t]).sum(dim=1) + (
            ROUNDING_SLACK
            * self.max_norm
            * (self.target_norms + (weights * self.norms[selected]).sum(dim=1))
        )
        # The chosen atoms' alpha is zero up to rounding: set it to zero, so that it cannot
        # pass a positive threshold (a row whose threshold is not positive goes to the
        # float32 fallback, which excludes them).
        alpha.scatter_(1, selected, 0.0)
        blocks = alpha.view(b, -1, ARGMAX_BLOCK)
        # amax and amin: 10x faster than aminmax over blocks of 64 on CPU.
        block_best = torch.maximum(blocks.amax(dim=2), blocks.amin(dim=2).neg_())
        # The screened best's float32 |alpha| is a lower bound on the pick's: every anchor
        # whose screened |alpha| is within the bound of it is a candidate.
        best_block = block_best.argmax(dim=1)
        rows = torch.arange(b, device=alpha.device)
        best = best_block * ARGMAX_BLOCK + blocks[rows, best_block].abs().argmax(dim=1)
        best_exact = torch.linalg.vecdot(self.padded_points[best], self.residual).abs()
        threshold = best_exact - bound
        row, block = (block_best >= threshold.unsqueeze(1)).nonzero(as_tuple=True)
        crowded = torch.bincount(row, minlength=b) > self.fallback_blocks
        crowded |= threshold <= 0
        if crowded.any():
            kept = ~crowded[row]
            row, block = row[kept], block[kept]
        inside, offset = (blocks[row, block].abs() >= threshold[row].unsqueeze(1)).nonzero(
            as_tuple=True
        )
        row, column = row[inside], block[inside] * ARGMAX_BLOCK + offset
        exact = torch.linalg.vecdot(self.points[column], self.residual[row]).abs()
        top = torch.full((b,), -1.0, dtype=exact.dtype, device=exact.device)
        top.scatter_reduce_(0, row, exact, "amax")
        is_top = exact == top[row]
        atoms = torch.full((b,), num_points, dtype=torch.long, device=exact.device)
        atoms.scatter_reduce_(0, row[is_top], column[is_top], "amin")
        if crowded.any():
            rows = crowded.nonzero().squeeze(1)
            exact_alpha = self.residual[rows] @ self.points.T
            scores = _scores_buffer(rows.numel(), num_points, exact_alpha)
            atoms[rows] = _pick_atoms(exact_alpha, scores, selected[rows])
        return atoms

    def advance(self, t: int, atom: torch.Tensor, inv_d: torch.Tensor) -> torch.Tensor:
        z = super().advance(t, atom, inv_d)
        if t < self.rows.shape[1]:
            self.scales[:, t] = self.gram.rows(atom, self.rows[:, t], self.row_bytes)
        return z


def _omp_chunk(
    all_targets: torch.Tensor,
    start: int,
    stop: int,
    k: int,
    eps: float,
    solver: _GramSolver | _ResidualSolver | _Int8GramSolver,
    state: _ChunkState,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP for targets ``start:stop``; see the module docstring for the notation."""
    targets = all_targets[start:stop]
    b = targets.shape[0]
    tolerance = DEPENDENCE_TOLERANCE_ULPS * torch.finfo(targets.dtype).eps
    selected, lower, z = state.selected[:b], state.lower[:b], state.z[:b]
    lower.zero_()
    solver.begin(targets, start, state)

    for t in range(k):
        atom = solver.pick(selected[:, :t])
        selected[:, t] = atom
        # d^2: squared norm of a_j's part orthogonal to q_0..q_{t-1}.
        w, norm_squared, d_squared = solver.project(t, atom)
        independent = (d_squared > tolerance * norm_squared) & (d_squared > eps * eps)
        d = torch.where(independent, d_squared.clamp(min=0).sqrt(), torch.ones_like(d_squared))
        inv_d = torch.where(independent, 1 / d, torch.zeros_like(d))
        z[:, t] = solver.advance(t, atom, inv_d)
        lower[:, t, :t] = w * independent.unsqueeze(1)
        lower[:, t, t] = d

    coeffs = torch.linalg.solve_triangular(
        lower.transpose(1, 2), z.unsqueeze(-1), upper=True
    ).squeeze(-1)
    return selected.clone(), coeffs


def _scores_buffer(rows: int, num_points: int, like: torch.Tensor) -> torch.Tensor:
    """Room for |alpha| with the selected atoms at -inf, padded with -inf to whole argmax
    blocks (see ``_pick_atoms``)."""
    padded = -(-num_points // ARGMAX_BLOCK) * ARGMAX_BLOCK
    return torch.full((rows, padded), -math.inf, dtype=like.dtype, device=like.device)


def _pick_atoms(alpha: torch.Tensor, scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """argmax |alpha| over the atoms not yet selected (lowest index on ties, like torch.max).

    torch's argmax is a scalar loop on CPU; a vectorised max per block of ARGMAX_BLOCK
    columns followed by two small argmaxes is several times faster and picks the same index
    (the first block holding the maximum, then the first maximum inside it).
    """
    b, num_points = alpha.shape
    torch.abs(alpha, out=scores[:, :num_points])
    if selected.shape[1] > 0:
        scores.scatter_(1, selected, -math.inf)
    blocks = scores.view(b, -1, ARGMAX_BLOCK)
    best_block = blocks.amax(dim=2).argmax(dim=1)
    rows = torch.arange(b, device=alpha.device)
    return best_block * ARGMAX_BLOCK + blocks[rows, best_block].argmax(dim=1)
