"""Time mergekit_omp.kernels.omp.batch_omp against mergekit.tokensurgeon.batch_omp on the same inputs.

    python benchmarks/omp_speed.py [--quick] [--tokens B] [--mergekit-tokens M]
                                   [--anchors N ...] [--dims D ...] [--k K]
                                   [--strategy full_gram|residual|int8_gram] [--screen on|off]

Both run in this process on Gaussian anchors (N x D) and targets (B x D), k atoms, float32.
Ours runs on all B targets, so its tokens/s includes building the N x N Gram matrix once,
amortised over those B. B defaults to 8192: a real transplant approximates thousands to
hundreds of thousands of tokens (3,131 for Gemma-3 <- SmolLM2, 216,122 the other way);
``--tokens 2048`` shows the Gram build's weight with fewer. mergekit has no shared
precomputation, so it is timed on the first M targets only; M defaults to 512, the batch
mergekit-tokensurgeon hands batch_omp by default, so its GEMMs run as efficiently as they
do for its users.

"same support" counts those M targets where both selected the same set of anchors; a
"near-tie" differs only where the two anchors' exact (float64) scores at the first
differing pick were within 1e-5, so float32 rounding decided it. "peak" is the growth of
this process's peak resident set during the call (Linux VmHWM, reset before each call);
"planned" is the working set batch_omp sizes from its budget (Gram plus one chunk's state)
and "analytic" mergekit's main tensors.

``--strategy`` and ``--screen`` force what batch_omp would otherwise plan: timing both
strategies on the same shapes is how the cost model's constants in ``mergekit_omp/kernels/omp.py``
are refitted (docs/performance.md, "Refitting the cost model").
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from machine import print_machine
from mergekit.tokensurgeon import batch_omp as mergekit_batch_omp

from mergekit_omp.kernels import omp

FULL_GRID = [
    (16000, 1024),
    (16000, 2048),
    (16000, 4096),
    (32000, 1024),
    (32000, 2048),
    (32000, 4096),
]
QUICK_GRID = [(16000, 1024), (16000, 2048)]


@dataclass
class Timing:
    seconds: float
    peak_growth_bytes: int | None


@dataclass
class Row:
    anchors: int
    dim: int
    ours_tokens: int
    ours: Timing
    gram_seconds: float | None
    strategy: str
    planned_bytes: int
    mergekit_tokens: int
    mergekit: Timing
    mergekit_planned_bytes: int
    agree: int
    near_ties: int


def read_status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process in bytes (None where /proc is unavailable)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed(call: Callable[[], object]) -> tuple[object, Timing]:
    can_reset = reset_peak_rss()
    before = read_status_bytes("VmRSS")
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    peak = read_status_bytes("VmHWM")
    growth = peak - before if can_reset and peak is not None and before is not None else None
    return result, Timing(seconds, growth)


class GramTimer(logging.Handler):
    """Picks up the Gram build time that batch_omp logs at DEBUG level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("built the"):
            self.seconds = float(record.args[-1])


def warm_up(k: int) -> None:
    """One small call of each, so thread pools and kernels are set up before timing."""
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(4 * k, 256, generator=generator)
    targets = torch.randn(256, 256, generator=generator)
    omp.batch_omp(targets, points, k)
    mergekit_batch_omp(targets, points, k)


@dataclass(frozen=True)
class Forced:
    """What the command line forces instead of batch_omp's plan (None: planned)."""

    strategy: omp.Strategy | None = None
    screen: bool | None = None


PLANNED = Forced()


def planned(
    tokens: int, anchors: int, dim: int, k: int, budget: int | None, forced: Forced
) -> tuple[str, int]:
    """batch_omp's plan for these shapes (``plan_call``: route, screened or not, targets per
    chunk) and its planned working set in bytes."""
    plan = omp.plan_call(
        tokens,
        anchors,
        dim,
        k,
        torch.float32,
        torch.device("cpu"),
        memory_budget_bytes=budget,
        strategy=forced.strategy,
        screen=forced.screen,
    )
    route = f"{plan.strategy}, {'screened' if plan.screened else 'not screened'}"
    return f"{route}, chunk {plan.chunk_tokens}", plan.working_bytes


def mergekit_working_set(tokens: int, anchors: int, dim: int, k: int) -> int:
    """q (B, D, k), r (B, k, k), |inner| (B, N), the mask and a few (B, D) temporaries."""
    return tokens * (4 * (dim * k + k * k + anchors + 4 * dim) + anchors)


def near_tie(
    ours: torch.Tensor, theirs: torch.Tensor, target: torch.Tensor, points: torch.Tensor
) -> bool:
    """At the first differing pick, are both anchors' exact (float64) scores within 1e-5?"""
    step = int((ours != theirs).nonzero()[0])
    points64, residual = points.double(), target.double()
    if step:
        prefix = points64[ours[:step]]
        solution = torch.linalg.lstsq(prefix.T, residual.unsqueeze(1)).solution.squeeze(1)
        residual = residual - prefix.T @ solution
    scores = (points64 @ residual).abs()
    return bool((scores[ours[step]] - scores[theirs[step]]).abs() <= 1e-5 * scores.max())


def measure(
    anchors: int,
    dim: int,
    k: int,
    tokens: int,
    mergekit_tokens: int,
    seed: int,
    budget: int | None = None,
    forced: Forced = PLANNED,
) -> Row:
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(anchors, dim, generator=generator)
    targets = torch.randn(tokens, dim, generator=generator)
    # mergekit first: its small allocations would otherwise reuse pages freed by ours.
    subset = targets[:mergekit_tokens]
    (ref_idx, _), theirs = timed(lambda: mergekit_batch_omp(subset, points, k))
    strategy, planned_bytes = planned(tokens, anchors, dim, k, budget, forced)
    gram_timer = GramTimer()
    omp.LOG.addHandler(gram_timer)
    omp.LOG.setLevel(logging.DEBUG)
    try:
        (ours_idx, _), ours = timed(
            lambda: omp.batch_omp(
                targets,
                points,
                k,
                memory_budget_bytes=budget,
                strategy=forced.strategy,
                screen=forced.screen,
            )
        )
    finally:
        omp.LOG.removeHandler(gram_timer)
    ours_idx = ours_idx[:mergekit_tokens]
    same = (ours_idx.sort(dim=1).values == ref_idx.sort(dim=1).values).all(dim=1)
    differ = (~same).nonzero().flatten().tolist()
    ties = sum(near_tie(ours_idx[b], ref_idx[b], subset[b], points) for b in differ)
    return Row(
        anchors,
        dim,
        tokens,
        ours,
        gram_timer.seconds,
        strategy,
        planned_bytes,
        mergekit_tokens,
        theirs,
        mergekit_working_set(mergekit_tokens, anchors, dim, k),
        int(same.sum()),
        ties,
    )


def size(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1024**3:.2f} GiB" if value >= 1024**3 else f"{value / 1024**2:.0f} MiB"


def print_header(k: int) -> None:
    print(f"k={k}, float32")  # the machine: print_machine()
    print(
        "| N | D | plan (route, screen, chunk) | ours tokens | ours tok/s | of which Gram s | mergekit tokens "
        "| mergekit tok/s | ratio | same support (near-ties) | ours peak (planned) "
        "| mergekit peak (analytic) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")


def print_row(row: Row) -> None:
    ours_rate = row.ours_tokens / row.ours.seconds
    theirs_rate = row.mergekit_tokens / row.mergekit.seconds
    gram = "n/a" if row.gram_seconds is None else f"{row.gram_seconds:.1f}"
    print(
        f"| {row.anchors} | {row.dim} | {row.strategy} | {row.ours_tokens} | {ours_rate:.1f} "
        f"| {gram} "
        f"| {row.mergekit_tokens} | {theirs_rate:.2f} | {ours_rate / theirs_rate:.1f}x "
        f"| {row.agree}/{row.mergekit_tokens} ({row.near_ties}) "
        f"| {size(row.ours.peak_growth_bytes)} ({size(row.planned_bytes)}) "
        f"| {size(row.mergekit.peak_growth_bytes)} ({size(row.mergekit_planned_bytes)}) |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="N=16000, D in {1024, 2048}, 512 and 64 targets"
    )
    parser.add_argument("--tokens", type=int, default=None, help="targets for ours (8192)")
    parser.add_argument(
        "--mergekit-tokens", type=int, default=None, help="targets for mergekit (512)"
    )
    parser.add_argument("--anchors", type=int, nargs="+", default=None, help="N values")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="D values")
    parser.add_argument(
        "--memory-budget-gib", type=float, default=None, help="batch_omp's memory budget"
    )
    parser.add_argument(
        "--strategy",
        choices=["full_gram", "residual", "int8_gram"],
        default=None,
        help="force a strategy",
    )
    parser.add_argument(
        "--screen", choices=["on", "off"], default=None, help="force bfloat16 screening"
    )
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    anchors = args.anchors or ([16000] if args.quick else [16000, 32000])
    dims = args.dims or ([1024, 2048] if args.quick else [1024, 2048, 4096])
    tokens = args.tokens or (512 if args.quick else 8192)
    mergekit_tokens = min(tokens, args.mergekit_tokens or (64 if args.quick else 512))
    budget = None if args.memory_budget_gib is None else int(args.memory_budget_gib * 1024**3)
    forced = Forced(args.strategy, None if args.screen is None else args.screen == "on")
    print_machine()
    print_header(args.k)
    started = time.perf_counter()
    warm_up(args.k)
    for num_anchors in anchors:
        for dim in dims:
            row = measure(
                num_anchors, dim, args.k, tokens, mergekit_tokens, args.seed, budget, forced
            )
            print_row(row)
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
