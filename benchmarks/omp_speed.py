"""Time mergekit_omp.omp.batch_omp against mergekit.tokensurgeon.batch_omp on the same inputs.

    python benchmarks/omp_speed.py [--quick] [--tokens B] [--mergekit-tokens M]

Both run in this process on Gaussian anchors (N x D) and targets (B x D) with k atoms. Ours
runs on B targets, so its tokens/s includes building the N x N Gram matrix once, amortised
over those B; mergekit costs the same per token whatever B is (it has no shared
precomputation), so it is timed on its first M targets only, which agree with ours as sets
of selected anchors for the "agree" column. Peak memory is the growth of this process's
peak resident set during each call (Linux VmHWM, reset before each call); "planned" is the
working set batch_omp sizes from its budget (Gram plus one chunk's state).
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from mergekit.tokensurgeon import batch_omp as mergekit_batch_omp

from mergekit_omp import omp

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
    planned_bytes: int
    mergekit_tokens: int
    mergekit: Timing
    agree: float


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


def planned_bytes(tokens: int, anchors: int, k: int) -> int:
    budget = omp.default_memory_budget(torch.device("cpu"))
    plan = omp.plan_omp(tokens, anchors, k, torch.float32, budget)
    row = anchors * 4
    gram = anchors * row if plan.strategy == "full_gram" else plan.cached_gram_rows * row
    return gram + plan.chunk_tokens * (k + 4) * row


def measure(anchors: int, dim: int, k: int, tokens: int, mergekit_tokens: int, seed: int) -> Row:
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(anchors, dim, generator=generator)
    targets = torch.randn(tokens, dim, generator=generator)
    gram_timer = GramTimer()
    omp.LOG.addHandler(gram_timer)
    omp.LOG.setLevel(logging.DEBUG)
    try:
        (ours_idx, _), ours = timed(lambda: omp.batch_omp(targets, points, k))
    finally:
        omp.LOG.removeHandler(gram_timer)
    subset = targets[:mergekit_tokens]
    (ref_idx, _), theirs = timed(lambda: mergekit_batch_omp(subset, points, k))
    same = ours_idx[:mergekit_tokens].sort(dim=1).values == ref_idx.sort(dim=1).values
    return Row(
        anchors,
        dim,
        tokens,
        ours,
        gram_timer.seconds,
        planned_bytes(tokens, anchors, k),
        mergekit_tokens,
        theirs,
        float(same.all(dim=1).float().mean()),
    )


def gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1024**3:.2f}"


def print_header(k: int) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, k={k}, float32"
    )
    print(
        "| N | D | ours tokens | ours tok/s | of which Gram s | mergekit tokens | mergekit tok/s "
        "| ratio | supports agree | ours peak GiB (planned) | mergekit peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")


def print_row(row: Row) -> None:
    ours_rate = row.ours_tokens / row.ours.seconds
    theirs_rate = row.mergekit_tokens / row.mergekit.seconds
    gram = "n/a" if row.gram_seconds is None else f"{row.gram_seconds:.1f}"
    print(
        f"| {row.anchors} | {row.dim} | {row.ours_tokens} | {ours_rate:.1f} | {gram} "
        f"| {row.mergekit_tokens} | {theirs_rate:.2f} | {ours_rate / theirs_rate:.1f}x "
        f"| {row.agree:.1%} | {gib(row.ours.peak_growth_bytes)} ({gib(row.planned_bytes)}) "
        f"| {gib(row.mergekit.peak_growth_bytes)} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=16000, D in {1024, 2048} only")
    parser.add_argument("--tokens", type=int, default=None, help="targets for ours")
    parser.add_argument("--mergekit-tokens", type=int, default=None, help="targets for mergekit")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    grid = QUICK_GRID if args.quick else FULL_GRID
    tokens = args.tokens or (512 if args.quick else 2048)
    mergekit_tokens = min(tokens, args.mergekit_tokens or (32 if args.quick else 64))
    print_header(args.k)
    started = time.perf_counter()
    for anchors, dim in grid:
        print_row(measure(anchors, dim, args.k, tokens, mergekit_tokens, args.seed))
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
