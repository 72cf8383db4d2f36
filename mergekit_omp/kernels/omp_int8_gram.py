"""Exact OMP picks from an int8 Gram matrix: screen every anchor from G, check a few exactly.

residual recomputes all N correlations alpha_t = C r_t by a (chunk x D) @ (D x N) GEMM in
every iteration: N D multiply-adds per target per iteration. With the LS coefficients
gamma of the atoms S chosen so far, r_t = x - C_S^T gamma, so

    alpha_t = C x - G[S]^T gamma

needs only the first GEMM (alpha_0 = C x) and t rows of G = C C^T: N t multiply-adds. G in
float32 is 8.5 GB for 46,018 anchors; here each row is stored in int8 with its own scale
(the diagonal, the row's largest entry, kept apart in float32), N^2 bytes. The int8 rows
only screen:

    |alpha~_i - alpha_i| <= E = sum_s |gamma_s| scale_s / 2 + rounding      for every i

so the true argmax i_b of |alpha| satisfies |alpha~_ib| >= M~ - 2 E, where M~ is the
screened maximum. The anchors above that threshold (a few per target: the int8 error is a
254th of a row's largest off-diagonal entry) get their float32 correlation <a_i, r_t>
computed from the residual, which ``_ResidualSolver`` keeps in embedding space, and the best
of those is the pick, lowest index on ties as in mergekit: the same picks as float32
residual.

The rounding term covers float32 rounding of alpha_0 (against the residual's own GEMM),
of G's entries and of the product with gamma: ``ROUNDING_SLACK`` times
(|x| + sum_s |gamma_s| |a_s|) max_i |a_i|, above D 2^-24 for D up to 1024 (the summed
rounding of length-D float32 dot products is at most D 2^-24 of |a| |r| and typically a
sqrt(D)-th of that).
"""

from __future__ import annotations

import time

import torch

INT8_LEVELS = 127
ROUNDING_SLACK = 1e-4
"""Relative rounding allowance of the bound (module docstring)."""
BUILD_BLOCK_ROWS = 1024
"""Rows of G computed in float32 and quantized per step (188 MB at N = 46,018)."""
BOUND_SAFETY = 1.01
"""Margin on the quantization term for the float32 rounding of gamma and the scales."""


class Int8Gram:
    """G = C C^T with each row in int8 and a float32 scale, its diagonal in float32; rows
    padded with zeros to ``padded`` entries."""

    def __init__(self, points: torch.Tensor, allocate, padded: int) -> None:
        start = time.perf_counter()
        num_points = points.shape[0]
        self.values = allocate((num_points, padded), torch.empty(0, dtype=torch.int8))
        self.values[:, num_points:] = 0
        self.scales = torch.empty(num_points, dtype=torch.float32, device=points.device)
        self.diagonal = (points * points).sum(dim=1)
        block = torch.empty(
            (min(BUILD_BLOCK_ROWS, num_points), num_points),
            dtype=points.dtype,
            device=points.device,
        )
        for first in range(0, num_points, BUILD_BLOCK_ROWS):
            last = min(first + BUILD_BLOCK_ROWS, num_points)
            rows = block[: last - first]
            torch.matmul(points[first:last], points.T, out=rows)
            rows.diagonal(offset=first).zero_()
            # amax and amin: 10x faster than an infinity norm on CPU.
            largest = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_())
            scales = largest.clamp(min=torch.finfo(torch.float32).tiny) / INT8_LEVELS
            self.scales[first:last] = scales
            rows.mul_((1 / scales).unsqueeze(1)).round_()
            self.values[first:last, :num_points].copy_(rows)
        self.seconds = time.perf_counter() - start

    def rows(self, atoms: torch.Tensor, out: torch.Tensor, staging: torch.Tensor) -> torch.Tensor:
        """Rows G[atoms] in units of their scales (float32) into ``out``, the diagonal
        exact; ``staging`` is an int8 buffer of the same shape. Returns the scales: G[atoms]
        is ``out`` times them, each entry within half a scale."""
        torch.index_select(self.values, 0, atoms, out=staging)
        out.copy_(staging)
        scales = self.scales[atoms]
        out.scatter_(1, atoms.unsqueeze(1), (self.diagonal[atoms] / scales).unsqueeze(1))
        return scales
