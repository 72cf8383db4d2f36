"""Exact argmax of |C r| from a bfloat16 GEMM: screen every anchor cheaply, check a few exactly.

The residual strategy's cost is one (chunk x D) @ (D x N) GEMM per OMP iteration. CPUs with
AVX-512 BF16 (and GPUs) run it about 4x faster in bfloat16, but bfloat16 scores alone would
pick different atoms than mergekit's float32 ones. So the bfloat16 scores only screen:

    |S~_j - S_j| <= Delta   for every anchor j (a rigorous rounding bound, below)

and the true argmax j_b satisfies |S_jb| >= |S_j*| >= M~ - Delta, where j* is the screened
argmax and M~ = |S~_j*|, hence |S~_jb| >= M~ - 2 Delta. Only the anchors above that threshold
(a handful per target: the bound is a few bfloat16 ulps of |r| |a| while the scores near the
maximum are spread over |r| |a| / sqrt(D)) get their float32 score recomputed, and the best
of those is the pick, lowest index on ties as in mergekit. Rows whose threshold is not
positive (residual at rounding level) or that have too many candidates are left to the
caller's float32 pass over every anchor.

The bound, with r~ = bf16(r), e_r = r - r~, a~ = bf16(a), e_a = a - a~ (both exact in float32)
and u = 2^-8 the bfloat16 unit roundoff:

    r.a - r~.a~ = r~.e_a + e_r.a~ + e_r.e_a                  <= |r~| E + |e_r| (A + E)
    float32 accumulation of the D exact products r~_d a~_d   <= g_D |r~| A
    rounding the accumulated score to bfloat16               <= u M~ / (1 - u)
    our float32 recomputation of the candidates' r.a         <= g_D (|r~| + |e_r|) (A + E)

with E = |e_a_j|, A = |a~_j| and g_D = D 2^-24 / (1 - D 2^-24). Blocks of anchors are
screened first against their largest A and E, then the anchors inside candidate blocks
against their own. The scores are compared as the raw bits of their absolute values
(int16), which order like the values.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from mergekit_omp.kernels.calibrate import machine_rates

BF16_UNIT_ROUNDOFF = 2.0**-8
SCREEN_BLOCK = 64
"""Anchors per block: candidates are found by block maxima first, then within the blocks."""
BOUND_SAFETY = 1.05
"""Margin on the rounding bound for the float32 rounding of the norms it is built from."""
FALLBACK_BLOCK_SHARE = 8
"""A row with candidates in more than 1 / this share of the blocks is left undecided, for a
float32 pass over every anchor (checking the candidates one by one would cost more)."""
ABS_MASK = 0x7FFF


BF16_MIN_SPEEDUP = 1.5
"""Screening is the default where a bfloat16 GEMM measures at least this many times a float32
one (``calibrate.machine_rates``): 2.4x with AVX-512 BF16, 0.3x on AVX2 alone, where the
screen would make OMP three times slower."""


@functools.cache
def bf16_matmul_is_fast(device_type: str) -> bool:
    """bfloat16 GEMMs beat float32 by ``BF16_MIN_SPEEDUP`` on GPUs, and on CPUs where this
    machine's calibration measured it (AVX-512 BF16 or AMX, not AVX2 alone)."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    rates = machine_rates("cpu")
    return rates.bfloat16_gemm >= BF16_MIN_SPEEDUP * rates.float32_gemm


GEMM_ROW_ALIGN = 16
"""The screening GEMM runs on a multiple of this many rows (zero rows added): oneDNN's
bfloat16 GEMM runs at 220 to 300 GMAC/s with 779, 782 or 783 rows, 370 to 410 with 780,
784 or 800 (46,080 x 576 anchors, AVX-512 BF16)."""


def padded_anchor_count(num_points: int) -> int:
    return -(-num_points // SCREEN_BLOCK) * SCREEN_BLOCK


def aligned_rows(rows: int) -> int:
    return -(-rows // GEMM_ROW_ALIGN) * GEMM_ROW_ALIGN


class Bf16Screen:
    """bfloat16 copy of the anchors, sorted by norm, and the norms the rounding bound needs.

    The bound for anchor j grows with |a_j| and |e_a_j|; sorting the anchors by norm makes
    each screening block's largest norm close to all of its anchors' (embedding norms vary
    2x and more), so per-block thresholds stay tight.
    """

    def __init__(self, points: torch.Tensor) -> None:
        if points.dtype != torch.float32:
            raise ValueError(f"bfloat16 screening needs float32 anchors, got {points.dtype}")
        num_points, dim = points.shape
        padded = padded_anchor_count(num_points)
        self.points = points
        self.order = points.norm(dim=1).argsort(descending=True, stable=True)
        self.position = torch.empty_like(self.order)
        self.position[self.order] = torch.arange(num_points, device=points.device)
        in_order = points.index_select(0, self.order)
        self.points_bf16 = torch.zeros((padded, dim), dtype=torch.bfloat16, device=points.device)
        self.points_bf16[:num_points] = in_order
        rounded = self.points_bf16.float()
        self.norms = rounded.norm(dim=1)
        self.errors = torch.zeros_like(self.norms)
        self.errors[:num_points] = (in_order - rounded[:num_points]).norm(dim=1)
        del in_order, rounded
        self._pair_rows = torch.empty((0, dim), dtype=points.dtype, device=points.device)
        self._pair_anchors = torch.empty_like(self._pair_rows)
        self._rows_bf16 = torch.empty((0, dim), dtype=torch.bfloat16, device=points.device)
        self.block_norms = self.norms.view(-1, SCREEN_BLOCK).amax(dim=1)
        self.block_errors = self.errors.view(-1, SCREEN_BLOCK).amax(dim=1)
        self.accumulation = dim * 2.0**-24 / (1 - dim * 2.0**-24)

    def pick(
        self, residual: torch.Tensor, selected: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """argmax_j |<r, a_j>| over the anchors not in ``selected``, as float32 scores decide.

        ``scores`` is an (``aligned_rows(b)``, padded N) bfloat16 buffer, overwritten. Returns
        the picks and the rows the screen could not decide (their picks are undefined): those
        need a float32 pass over every anchor.
        """
        b = residual.shape[0]
        num_points = self.points.shape[0]
        gemm_rows = self._gemm_rows(scores.shape[0], residual)
        rounded = gemm_rows[:b]
        rounded.copy_(residual)
        gemm_rows[b:].zero_()
        with _float32_accumulation(residual.device):
            torch.matmul(gemm_rows, self.points_bf16.T, out=scores)
        scores = scores[:b]
        bits = scores.view(torch.int16)
        bits.bitwise_and_(ABS_MASK)
        if selected.shape[1] > 0:
            bits.scatter_(1, self.position[selected], 0)
        blocks = bits.view(b, -1, SCREEN_BLOCK)
        block_max = blocks.amax(dim=2)
        best_bits, best_block = block_max.max(dim=1)
        screened_max = _bits_to_float(best_bits)
        norm_weight, error_weight, offset = self.bound_coefficients(residual, rounded, screened_max)
        # |S_jb| >= M~ - Delta* for the true best j_b, so |S~_jb| >= M~ - Delta* - Delta_jb.
        best_bound = (
            norm_weight * self.block_norms[best_block]
            + error_weight * self.block_errors[best_block]
            + offset
        )
        base = (screened_max - best_bound - offset).unsqueeze(1)
        norm_weight, error_weight = norm_weight.unsqueeze(1), error_weight.unsqueeze(1)
        block_threshold = base - norm_weight * self.block_norms - error_weight * self.block_errors
        block_bits = _float_to_bits_rounded_down(block_threshold)

        candidate_blocks = block_max >= block_bits
        too_many = _count_per_row(candidate_blocks) * FALLBACK_BLOCK_SHARE > block_max.shape[1]
        # A threshold that is not positive would admit the zeroed (selected) anchors.
        fallback = (block_bits.amin(dim=1) < 1) | too_many
        candidate_blocks &= ~fallback.unsqueeze(1)
        rows, block = candidate_blocks.nonzero(as_tuple=True)
        positions = block.unsqueeze(1) * SCREEN_BLOCK + torch.arange(
            SCREEN_BLOCK, device=residual.device
        )
        threshold = (
            base[rows]
            - norm_weight[rows] * _rows_of(self.norms, block)
            - error_weight[rows] * _rows_of(self.errors, block)
        )
        candidate_bits = _rows_of(bits, rows * blocks.shape[1] + block)
        in_block = _bits_to_float(candidate_bits) >= threshold
        in_block &= positions < num_points
        pair, offset_in_block = in_block.nonzero(as_tuple=True)
        rows = rows[pair]
        anchors = self.order[block[pair] * SCREEN_BLOCK + offset_in_block]

        exact = self._exact_scores(residual, rows, anchors)
        best = torch.full((b,), -1.0, device=residual.device).scatter_reduce(0, rows, exact, "amax")
        winner = exact == best[rows]
        atoms = torch.full((b,), num_points, dtype=torch.long, device=residual.device)
        atoms.scatter_reduce_(0, rows[winner], anchors[winner], "amin")

        return atoms, fallback.nonzero().flatten()

    def _gemm_rows(self, rows: int, residual: torch.Tensor) -> torch.Tensor:
        """The bfloat16 GEMM input, kept from call to call like the pair buffers below."""
        if self._rows_bf16.shape[0] != rows:
            self._rows_bf16 = residual.new_empty((rows, residual.shape[1]), dtype=torch.bfloat16)
        return self._rows_bf16

    def _exact_scores(
        self, residual: torch.Tensor, rows: torch.Tensor, anchors: torch.Tensor
    ) -> torch.Tensor:
        """|<r_i, a_j>| in float32 for each candidate pair (i, j) of ``rows`` and ``anchors``.

        The pairs' rows are gathered into buffers kept from call to call: fresh multi-MB
        tensors each iteration cost more in page faults than the products themselves.
        """
        pairs = rows.numel()
        if self._pair_rows.shape[0] < pairs:
            grown = max(pairs, 2 * self._pair_rows.shape[0])
            self._pair_rows = self._pair_rows.new_empty((grown, self._pair_rows.shape[1]))
            self._pair_anchors = torch.empty_like(self._pair_rows)
        left = torch.index_select(residual, 0, rows, out=self._pair_rows[:pairs])
        right = torch.index_select(self.points, 0, anchors, out=self._pair_anchors[:pairs])
        return left.mul_(right).sum(dim=1).abs_()

    def bound_coefficients(
        self, residual: torch.Tensor, rounded: torch.Tensor, screened_max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row, (x, y, c) with |S~_j - S_j| <= x |a~_j| + y |e_a_j| + c for every
        unselected anchor j (the terms of the module docstring, with E and A per anchor)."""
        widened = rounded.float()
        rounded_norm = widened.norm(dim=1)
        error_norm = (residual - widened).norm(dim=1)
        gamma = self.accumulation
        norm_weight = error_norm + gamma * (2 * rounded_norm + error_norm)
        error_weight = (rounded_norm + error_norm) * (1 + gamma)
        offset = BF16_UNIT_ROUNDOFF / (1 - BF16_UNIT_ROUNDOFF) * screened_max
        return BOUND_SAFETY * norm_weight, BOUND_SAFETY * error_weight, BOUND_SAFETY * offset


@contextlib.contextmanager
def _float32_accumulation(device: torch.device) -> Iterator[None]:
    """cuBLAS may reduce split-K partial sums in bfloat16 unless told not to; the bound
    assumes float32 accumulation (oneDNN on CPU always accumulates in float32)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = previous


def _rows_of(values: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The ``SCREEN_BLOCK`` entries of each of ``blocks`` (flat block numbers) of ``values``."""
    return values.view(-1, SCREEN_BLOCK).index_select(0, blocks)


def _count_per_row(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row of a 2-D boolean mask. Summed as bytes into int32: torch sums a
    bool tensor along rows through int64 about 35x slower (0.8 ms against 23 us for 448 x
    720, once per OMP iteration)."""
    return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32)


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Non-negative bfloat16 bit patterns (int16) to their float32 values."""
    return (bits.to(torch.int32) << 16).view(torch.float32)


def _float_to_bits_rounded_down(values: torch.Tensor) -> torch.Tensor:
    """float32 to the int16 bits of the largest bfloat16 not above them (0 when not positive)."""
    truncated = values.clamp(min=0).view(torch.int32) >> 16
    return truncated.to(torch.int16)
