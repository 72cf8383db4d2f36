#!/usr/bin/env python
"""Every OMP route on a real transplant's problem, against mergekit's batch_omp, one process.

    python benchmarks/omp_real.py [--direction smollm-from-gemma|gemma-from-smollm]
        [--tokens 4096] [--mergekit-tokens 256] [--k 16] [--routes residual,screened,int8_gram]
        [--avx2] [--cache DIR]

The problem is the one ``mergekit-omp BASE DONOR OUT -a omp`` solves for the input
embeddings: the donor rows of the new tokens (targets) and of the shared tokens (anchors),
built once from the real models that ``examples/real/prepare.py`` converts (see
docs/results.md) and cached as ``CACHE/omp-problems/DIRECTION.pt`` outside the repo.

A seeded sample of ``--tokens`` targets runs through each route of
``mergekit_omp.kernels.omp.batch_omp`` (forced with ``strategy=``; ``planned`` is what the
default plan takes on this machine) and its first ``--mergekit-tokens`` through
``mergekit.tokensurgeon.batch_omp``. Printed per route: tokens per second on the sample
(set-up excluded), the set-up (G, the bfloat16 anchors), the ratio to mergekit's tokens per
second, whether the picks equal float32 residual's, and the whole problem's estimated
seconds (set-up plus all its targets at the sample's rate). Routes and mergekit run in the
same process, one after the other, so their ratios hold on a loaded machine even where the
absolute figures do not.

``--avx2`` runs the same in a child process with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``: torch's own kernels, oneDNN and MKL
then use AVX2 only, as on a CPU without AVX-512 (an emulation: caches and memory stay this
machine's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import print_machine

DEFAULT_CACHE = Path(os.environ.get("MERGEKIT_OMP_CACHE", "~/.cache/mergekit-omp/real"))
DIRECTIONS = {
    "smollm-from-gemma": ("smollm2-135m", "gemma-3-270m"),
    "gemma-from-smollm": ("gemma-3-270m", "smollm2-135m"),
}
ROUTES = {
    "residual": {"strategy": "residual", "screen": False},
    "screened": {"strategy": "residual", "screen": True},
    "int8_gram": {"strategy": "int8_gram"},
    "full_gram": {"strategy": "full_gram"},
    "planned": {},
}
AVX2_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def omp_problem(cache: Path, direction: str) -> dict[str, torch.Tensor]:
    """The input-embedding OMP problem of ``direction``, built once and cached."""
    path = cache / "omp-problems" / f"{direction}.pt"
    if path.exists():
        return torch.load(path)
    from mergekit.options import MergeOptions

    from mergekit_omp.approximate import build_problem
    from mergekit_omp.load import load_pair
    from mergekit_omp.options import TransplantOptions
    from mergekit_omp.plan import plan_transplant

    base, donor = (str(cache / name) for name in DIRECTIONS[direction])
    options = TransplantOptions(base_model=base, donor=donor, bos="match_base")
    base_model, donor_model = load_pair(options.base_model, options.donor, MergeOptions())
    plan = plan_transplant(options, base_model, donor_model)
    matrix = plan.matrices[0]
    problem = build_problem(
        matrix.base_rows(base_model),
        matrix.donor_rows(donor_model),
        plan.match(matrix, base_model, donor_model),
        base_model,
        donor_model,
        is_lm_head=False,
        batch_size=None,
        progress=False,
        seed=0,
    )
    tensors = {
        "targets": problem.targets.float().contiguous(),
        "anchors": problem.donor_anchors.float().contiguous(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return tensors


def run(args: argparse.Namespace) -> None:
    from mergekit.tokensurgeon import batch_omp as mergekit_batch_omp

    from mergekit_omp.kernels.omp import batch_omp, plan_call, recorded_calls

    problem = omp_problem(args.cache.expanduser(), args.direction)
    all_targets, anchors = problem["targets"], problem["anchors"]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randperm(all_targets.shape[0], generator=generator)[: args.tokens]
    targets = all_targets[sample].contiguous()
    total = all_targets.shape[0]
    print_machine()
    print(
        f"{args.direction}: {total} targets (sample {targets.shape[0]}), "
        f"{anchors.shape[0]} anchors, D = {anchors.shape[1]}, k = {args.k}"
    )
    subset = targets[: args.mergekit_tokens]
    start = time.perf_counter()
    mergekit_picks, _ = mergekit_batch_omp(subset, anchors, args.k)
    mergekit_rate = subset.shape[0] / (time.perf_counter() - start)
    print(f"mergekit batch_omp: {mergekit_rate:.1f} tok/s on {subset.shape[0]} targets")
    print(
        "| route | plan | tok/s | set-up s | x mergekit | picks = float32 residual "
        "| = mergekit | whole problem s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    # Every route runs with the budget, and so the chunks, of the whole problem's default plan.
    whole_plan = plan_call(total, *anchors.shape, args.k, torch.float32, torch.device("cpu"))
    print(f"default plan of the whole problem: {whole_plan.reason()}")
    reference = None
    for route in args.routes.split(","):
        options = dict(ROUTES[route]) or {
            "strategy": whole_plan.strategy,
            "screen": whole_plan.screened,
        }
        with recorded_calls() as calls:
            picks, _ = batch_omp(
                targets,
                anchors,
                args.k,
                memory_budget_bytes=whole_plan.budget_bytes,
                **options,  # type: ignore[arg-type]
            )
        call = calls[0]
        rate = targets.shape[0] / max(call.seconds - call.setup_seconds, 1e-9)
        if route == "residual":
            reference = picks
        same = "" if reference is None else f"{(picks == reference).all(dim=1).float().mean():.4f}"
        agree = (picks[: subset.shape[0]] == mergekit_picks).all(dim=1).float().mean()
        plan = call.plan.strategy + (" screened" if call.plan.screened else "")
        whole = call.setup_seconds + total / rate
        print(
            f"| {route} | {plan} | {rate:.0f} | {call.setup_seconds:.1f} | "
            f"{rate / mergekit_rate:.1f}x | {same} | {agree:.4f} | {whole:.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direction", choices=list(DIRECTIONS), default="smollm-from-gemma")
    parser.add_argument("--tokens", type=int, default=4096, help="targets sampled (4096)")
    parser.add_argument(
        "--mergekit-tokens", type=int, default=256, help="of those, run through mergekit (256)"
    )
    parser.add_argument("--k", type=int, default=16, help="atoms per target (16)")
    parser.add_argument(
        "--routes",
        default="residual,screened,int8_gram,planned",
        help=f"comma-separated, of {', '.join(ROUTES)}; residual first gives the picks' reference",
    )
    parser.add_argument(
        "--avx2", action="store_true", help="also run in a child limited to AVX2 (see above)"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="real models' directory")
    args = parser.parse_args()
    run(args)
    if args.avx2:
        print("\n--- the same with AVX2 only ---", flush=True)
        child = [arg for arg in sys.argv[1:] if arg != "--avx2"]
        environment = {**os.environ, **AVX2_ENVIRONMENT}
        subprocess.run([sys.executable, __file__, *child], env=environment, check=True)


if __name__ == "__main__":
    main()
