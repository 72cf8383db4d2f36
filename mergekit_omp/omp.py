"""Batched Orthogonal Matching Pursuit through the anchor Gram matrix (Batch-OMP).

Same inputs, outputs and answers as ``mergekit.tokensurgeon.batch_omp``, but each iteration
works in anchor space (length N) instead of embedding space (length D): the correlations of
every anchor with the residual are updated from rows of the Gram matrix G = C C^T instead of
being recomputed as residual @ C^T. Reference: Rubinstein, Zibulevsky & Elad (2008),
"Efficient Implementation of the K-SVD Algorithm using Batch Orthogonal Matching Pursuit",
https://www.cs.technion.ac.il/~ronrubin/Publications/KSVD-OMP-v2.pdf

Notation used below, per target x (D) and anchors C (N x D):
    alpha = C r          correlations of the anchors with the residual r
    q_t                  t-th orthonormal direction (Gram-Schmidt of the selected atoms)
    d_t                  norm of the new atom's component orthogonal to q_0..q_{t-1}
    v_t = d_t C q_t      the new atom's Gram row with the old directions projected out
    z_t = <q_t, x>       so that r_t = r_{t-1} - z_t q_t and alpha_t = alpha_{t-1} - z_t C q_t
    L                    lower-triangular with L[t, s] = <q_s, a_t> and L[t, t] = d_t, i.e.
                         the transpose of mergekit's R (the Cholesky factor of G[I, I])
The coefficients are then L^T c = z, exactly what mergekit solves as R c = Q^T x.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

LOG = logging.getLogger(__name__)

DEFAULT_MEMORY_FRACTION = 0.5
"""Share of the currently available memory (RAM, or free memory of the GPU) used by default."""

FALLBACK_MEMORY_BUDGET_BYTES = 4 * 1024**3
"""Budget used when the available memory cannot be queried."""

MAX_CHUNK_TOKENS = 256
"""Upper bound on targets processed together; larger chunks gain nothing measurable."""

ARGMAX_BLOCK = 64
"""Columns per block in the two-level argmax over the anchors."""

GRAM_BLOCK_ROWS = 2048
"""Row block used to build the Gram matrix (only the upper triangle is multiplied)."""

DEPENDENCE_TOLERANCE_ULPS = 64
"""An atom whose orthogonal part has squared norm below this many machine epsilons of its
squared norm is treated as linearly dependent on the atoms already chosen."""

Strategy = Literal["full_gram", "gram_rows"]


@dataclass(frozen=True)
class OmpPlan:
    """How a call is executed: which Gram strategy, and how many targets per chunk."""

    strategy: Strategy
    chunk_tokens: int
    cached_gram_rows: int
    """Rows of G kept between iterations by the gram_rows strategy (N for full_gram)."""


def batch_omp(
    targets: torch.Tensor,
    candidate_points: torch.Tensor,
    k: int,
    eps: float = 1e-8,
    *,
    memory_budget_bytes: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> tuple[torch.LongTensor, torch.Tensor]:
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
            state; defaults to ``DEFAULT_MEMORY_FRACTION`` of the available memory.
        batch_size: targets per chunk; defaults to what the budget allows (at most
            ``MAX_CHUNK_TOKENS``).
        progress: show a tqdm bar over the chunks.
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

    targets_work = targets.to(dtype=work_dtype)
    points = candidate_points.to(device=device, dtype=work_dtype)
    budget = (
        memory_budget_bytes if memory_budget_bytes is not None else default_memory_budget(device)
    )
    plan = plan_omp(num_targets, num_points, k, work_dtype, budget, batch_size)
    LOG.debug("batch_omp plan: %s (B=%d, N=%d, D=%d, k=%d)", plan, num_targets, num_points, dim, k)

    gram_rows = _make_gram_rows(points, plan)
    state = _ChunkState(plan.chunk_tokens, num_points, k, targets_work)
    with tqdm(total=num_targets, desc="OMP", unit="tok", disable=not progress) as bar:
        for start in range(0, num_targets, plan.chunk_tokens):
            stop = min(start + plan.chunk_tokens, num_targets)
            chunk_indices, chunk_coeffs = _omp_chunk(
                targets_work[start:stop], points, k, eps, gram_rows, state
            )
            indices[start:stop] = chunk_indices
            coeffs[start:stop] = chunk_coeffs
            bar.update(stop - start)
    return indices, coeffs


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
    k: int,
    dtype: torch.dtype,
    memory_budget_bytes: int,
    batch_size: int | None = None,
) -> OmpPlan:
    """Choose the Gram strategy and chunk size from the shapes and the memory budget.

    ``full_gram`` builds all of G up front (N^2 D / 2 multiply-adds, using its symmetry). It
    is chosen when G fits in the budget next to a chunk's state and the targets will probably
    select most anchors (B k >= N ln 2 for uniformly spread selections), so that building
    rows only for selected anchors would not save work. Otherwise ``gram_rows`` computes the
    rows of the anchors actually selected (N D multiply-adds each) and caches as many as the
    budget allows, so memory never needs the whole N x N matrix.
    """
    row_bytes = num_points * torch.finfo(dtype).bits // 8
    # Per target: its k rows of v, alpha, |alpha|, a freshly computed Gram row, and slack.
    per_target = (k + 4) * row_bytes
    gram_bytes = num_points * row_bytes
    max_chunk = min(num_targets, batch_size or MAX_CHUNK_TOKENS)

    def chunk_for(available: int) -> int:
        if batch_size is not None:
            return max_chunk
        return max(1, min(max_chunk, available // per_target))

    most_rows_needed = num_targets * k >= math.log(2) * num_points
    full_chunk = chunk_for(memory_budget_bytes - gram_bytes)
    if most_rows_needed and gram_bytes + full_chunk * per_target <= memory_budget_bytes:
        return OmpPlan("full_gram", full_chunk, num_points)

    chunk = chunk_for(memory_budget_bytes // 2)
    cache_rows = (memory_budget_bytes - chunk * per_target) // row_bytes
    return OmpPlan("gram_rows", chunk, int(min(num_points, max(chunk, cache_rows))))


class _FullGram:
    """All of G = C C^T, built once; rows are gathered."""

    def __init__(self, points: torch.Tensor) -> None:
        start = time.perf_counter()
        self.gram = symmetric_gram(points)
        LOG.debug(
            "built the %s Gram matrix in %.3f s",
            tuple(self.gram.shape),
            time.perf_counter() - start,
        )

    def rows_into(self, atoms: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(self.gram, 0, atoms, out=out)


class _CachedGramRows:
    """Rows of G computed on demand (one GEMM per iteration for the new unique atoms).

    The first ``capacity`` distinct rows are kept; later ones are recomputed when needed.
    OMP picks the strongest atoms first, so the cached ones tend to be the popular ones.
    """

    def __init__(self, points: torch.Tensor, capacity: int) -> None:
        self.points = points
        num_points = points.shape[0]
        self.rows = torch.empty((capacity, num_points), dtype=points.dtype, device=points.device)
        self.slot_of_atom = torch.full((num_points,), -1, dtype=torch.long, device=points.device)
        self.used = 0

    def rows_into(self, atoms: torch.Tensor, out: torch.Tensor) -> None:
        unique_atoms = torch.unique(atoms)
        missing = unique_atoms[self.slot_of_atom[unique_atoms] < 0]
        fresh = self.points[missing] @ self.points.T if missing.numel() else None
        if fresh is not None:
            stored = min(self.rows.shape[0] - self.used, missing.shape[0])
            if stored > 0:
                self.rows[self.used : self.used + stored] = fresh[:stored]
                self.slot_of_atom[missing[:stored]] = torch.arange(
                    self.used, self.used + stored, device=atoms.device
                )
                self.used += stored
        slots = self.slot_of_atom[atoms]
        cached = slots >= 0
        if bool(cached.all()):
            torch.index_select(self.rows, 0, slots, out=out)
            return
        out[cached] = self.rows[slots[cached]]
        uncached_atoms = atoms[~cached]
        assert fresh is not None
        out[~cached] = fresh[torch.searchsorted(missing, uncached_atoms)]


def _make_gram_rows(points: torch.Tensor, plan: OmpPlan) -> _FullGram | _CachedGramRows:
    if plan.strategy == "full_gram":
        return _FullGram(points)
    return _CachedGramRows(points, plan.cached_gram_rows)


def symmetric_gram(points: torch.Tensor, block_rows: int = GRAM_BLOCK_ROWS) -> torch.Tensor:
    """G = points @ points.T, multiplying only the blocks on and above the diagonal."""
    num_points = points.shape[0]
    gram = torch.empty((num_points, num_points), dtype=points.dtype, device=points.device)
    for start in range(0, num_points, block_rows):
        stop = min(start + block_rows, num_points)
        gram[start:stop, start:] = points[start:stop] @ points[start:].T
        gram[stop:, start:stop] = gram[start:stop, stop:].T
    return gram


class _ChunkState:
    """Buffers for one chunk of targets, allocated once per call and reused by every chunk."""

    def __init__(self, chunk_tokens: int, num_points: int, k: int, like: torch.Tensor) -> None:
        options = {"dtype": like.dtype, "device": like.device}
        padded = -(-num_points // ARGMAX_BLOCK) * ARGMAX_BLOCK
        self.alpha = torch.empty((chunk_tokens, num_points), **options)
        # |alpha| with the selected atoms at -inf, padded with -inf to whole argmax blocks.
        self.scores = torch.full((chunk_tokens, padded), -math.inf, **options)
        # v[b, t] is target b's v_t; row t is complete before iteration t + 1 reads it.
        self.v = torch.empty((chunk_tokens, k, num_points), **options)
        self.selected = torch.zeros((chunk_tokens, k), dtype=torch.long, device=like.device)
        self.inv_d = torch.empty((chunk_tokens, k), **options)
        self.lower = torch.empty((chunk_tokens, k, k), **options)
        self.z = torch.empty((chunk_tokens, k), **options)


def _omp_chunk(
    targets: torch.Tensor,
    points: torch.Tensor,
    k: int,
    eps: float,
    gram_rows: _FullGram | _CachedGramRows,
    state: _ChunkState,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-OMP for one chunk of targets; see the module docstring for the notation."""
    b = targets.shape[0]
    tolerance = DEPENDENCE_TOLERANCE_ULPS * torch.finfo(targets.dtype).eps
    alpha, scores, v = state.alpha[:b], state.scores[:b], state.v[:b]
    selected, inv_d, lower, z = state.selected[:b], state.inv_d[:b], state.lower[:b], state.z[:b]
    lower.zero_()
    torch.matmul(targets, points.T, out=alpha)

    for t in range(k):
        atom = _pick_atoms(alpha, scores, selected[:, :t])
        selected[:, t] = atom
        v_t = v[:, t]
        gram_rows.rows_into(atom, out=v_t)
        gram_jj = v_t.gather(1, atom.unsqueeze(1)).squeeze(1)

        # w[s] = <q_s, a_j> = v_s[j] / d_s, and v_t = G[j] - sum_s w[s] v_s / d_s.
        w = v[:, :t].gather(2, atom.view(b, 1, 1).expand(b, t, 1)).squeeze(2) * inv_d[:, :t]
        if t > 0:
            v[:, t : t + 1].baddbmm_((w * inv_d[:, :t]).unsqueeze(1), v[:, :t], alpha=-1)
        # d^2 = |a_j|^2 - |w|^2, the squared norm of a_j's part orthogonal to q_0..q_{t-1}.
        d_squared = gram_jj - (w * w).sum(dim=1)
        independent = (d_squared > tolerance * gram_jj) & (d_squared > eps * eps)
        d = torch.where(independent, d_squared.clamp(min=0).sqrt(), torch.ones_like(d_squared))
        inv_d[:, t] = torch.where(independent, 1 / d, torch.zeros_like(d))

        # z_t = <q_t, x> = <a_j, r_{t-1}> / d = alpha[j] / d; then alpha -= z_t v_t / d.
        z[:, t] = alpha.gather(1, atom.unsqueeze(1)).squeeze(1) * inv_d[:, t]
        lower[:, t, :t] = w * independent.unsqueeze(1)
        lower[:, t, t] = d
        alpha.addcmul_(v_t, (z[:, t] * inv_d[:, t]).unsqueeze(1), value=-1)

    coeffs = torch.linalg.solve_triangular(
        lower.transpose(1, 2), z.unsqueeze(-1), upper=True
    ).squeeze(-1)
    return selected.clone(), coeffs


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
