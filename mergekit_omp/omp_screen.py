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
positive (residual at rounding level) or that have too many candidates are scored in float32
in full.

The bound, with r~ = bf16(r), e_r = r - r~, a~ = bf16(a), e_a = a - a~ (both exact in float32)
and u = 2^-8 the bfloat16 unit roundoff:

    r.a - r~.a~ = r~.e_a + e_r.a~ + e_r.e_a                  <= |r~| E + |e_r| (A + E)
    float32 accumulation of the D exact products r~_d a~_d   <= g_D |r~| A
    rounding the accumulated score to bfloat16               <= u M~ / (1 - u)
    our float32 recomputation of the candidates' r.a         <= g_D (|r~| + |e_r|) (A + E)

with E = max_j |e_a_j|, A = max_j |a~_j| and g_D = D 2^-24 / (1 - D 2^-24). The scores are
compared as the raw bits of their absolute values (int16), which order like the values.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch

BF16_UNIT_ROUNDOFF = 2.0**-8
SCREEN_BLOCK = 64
"""Anchors per block: candidates are found by block maxima first, then within the blocks."""
BOUND_SAFETY = 1.05
"""Margin on the rounding bound for the float32 rounding of the norms it is built from."""
FALLBACK_BLOCK_SHARE = 8
"""A row with candidates in more than 1 / this share of the blocks is scored in float32 in
full instead (checking candidates one by one costs more than the GEMM row then)."""
ABS_MASK = 0x7FFF


@functools.cache
def bf16_matmul_is_fast(device_type: str) -> bool:
    """bfloat16 GEMMs beat float32 on GPUs and on CPUs with AVX-512 BF16 or AMX."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def padded_anchor_count(num_points: int) -> int:
    return -(-num_points // SCREEN_BLOCK) * SCREEN_BLOCK


class Bf16Screen:
    """bfloat16 copy of the anchors and the norms the rounding bound needs."""

    def __init__(self, points: torch.Tensor) -> None:
        if points.dtype != torch.float32:
            raise ValueError(f"bfloat16 screening needs float32 anchors, got {points.dtype}")
        num_points, dim = points.shape
        self.points = points
        self.points_bf16 = torch.zeros(
            (padded_anchor_count(num_points), dim), dtype=torch.bfloat16, device=points.device
        )
        self.points_bf16[:num_points] = points
        rounded = self.points_bf16[:num_points].float()
        self.max_error_norm = float((points - rounded).norm(dim=1).max())
        self.max_norm = float(rounded.norm(dim=1).max())
        self.accumulation = dim * 2.0**-24 / (1 - dim * 2.0**-24)

    def pick(
        self, residual: torch.Tensor, selected: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor:
        """argmax_j |<r, a_j>| over the anchors not in ``selected``, as float32 scores decide.

        ``scores`` is a (b, padded N) bfloat16 buffer, overwritten.
        """
        b = residual.shape[0]
        num_points = self.points.shape[0]
        rounded = residual.to(torch.bfloat16)
        with _float32_accumulation(residual.device):
            torch.matmul(rounded, self.points_bf16.T, out=scores)
        bits = scores.view(torch.int16)
        bits.bitwise_and_(ABS_MASK)
        if selected.shape[1] > 0:
            bits.scatter_(1, selected, 0)
        blocks = bits.view(b, -1, SCREEN_BLOCK)
        block_max = blocks.amax(dim=2)
        screened_max = _bits_to_float(block_max.amax(dim=1))
        threshold = screened_max - 2 * self._bound(residual, rounded, screened_max)
        threshold_bits = _float_to_bits_rounded_down(threshold)

        candidate_blocks = block_max >= threshold_bits.unsqueeze(1)
        too_many = candidate_blocks.sum(dim=1) * FALLBACK_BLOCK_SHARE > block_max.shape[1]
        fallback = (threshold_bits < 1) | too_many
        candidate_blocks &= ~fallback.unsqueeze(1)
        rows, block = candidate_blocks.nonzero(as_tuple=True)
        in_block = blocks[rows, block] >= threshold_bits[rows].unsqueeze(1)
        pair, offset = in_block.nonzero(as_tuple=True)
        rows, anchors = rows[pair], block[pair] * SCREEN_BLOCK + offset
        valid = anchors < num_points
        rows, anchors = rows[valid], anchors[valid]

        exact = (residual[rows] * self.points[anchors]).sum(dim=1).abs()
        best = torch.full((b,), -1.0, device=residual.device).scatter_reduce(0, rows, exact, "amax")
        winner = exact == best[rows]
        atoms = torch.full((b,), num_points, dtype=torch.long, device=residual.device)
        atoms.scatter_reduce_(0, rows[winner], anchors[winner], "amin")

        fallback_rows = fallback.nonzero().flatten()
        if fallback_rows.numel() > 0:
            atoms[fallback_rows] = _float32_pick(
                residual[fallback_rows], self.points, selected[fallback_rows]
            )
        return atoms

    def _bound(
        self, residual: torch.Tensor, rounded: torch.Tensor, screened_max: torch.Tensor
    ) -> torch.Tensor:
        """Delta: the largest possible |S~_j - S_j| over the unselected anchors, per row."""
        rounded_norm = rounded.float().norm(dim=1)
        error_norm = (residual - rounded.float()).norm(dim=1)
        big, small = self.max_norm, self.max_error_norm
        products = rounded_norm * small + error_norm * (big + small)
        accumulation = self.accumulation * (
            rounded_norm * big + (rounded_norm + error_norm) * (big + small)
        )
        output = BF16_UNIT_ROUNDOFF / (1 - BF16_UNIT_ROUNDOFF) * screened_max
        return BOUND_SAFETY * (products + accumulation + output)


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


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Non-negative bfloat16 bit patterns (int16) to their float32 values."""
    return (bits.to(torch.int32) << 16).view(torch.float32)


def _float_to_bits_rounded_down(values: torch.Tensor) -> torch.Tensor:
    """float32 to the int16 bits of the largest bfloat16 not above them (0 when not positive)."""
    truncated = values.clamp(min=0).view(torch.int32) >> 16
    return truncated.to(torch.int16)


def _float32_pick(
    residual: torch.Tensor, points: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """Unscreened argmax of |r C^T| over the unselected anchors (lowest index on ties)."""
    scores = (residual @ points.T).abs()
    if selected.shape[1] > 0:
        scores.scatter_(1, selected, -math.inf)
    return scores.argmax(dim=1)
