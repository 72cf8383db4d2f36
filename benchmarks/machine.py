"""What machine a benchmark ran on, printed at its start (issue 25, item 4).

Every benchmark in this folder calls ``print_machine()`` first, so a figure copied from its
output always comes with the CPU it was measured on, the kernels torch picked for it
(``torch.backends.cpu.get_cpu_capability()``: AVX2 alone makes bfloat16 GEMMs slow), the
cores, torch's version and the GEMM rates ``mergekit_omp/kernels/calibrate.py`` measured
here, which decide whether OMP screens in bfloat16 by default
(``kernels/omp_screen.bf16_matmul_is_fast``). ``omp_route(report)`` gives the route a
``mergekit-omp`` run took, from its report's top-level ``omp`` key when the report has one.

    python benchmarks/machine.py     # the header alone
"""

from __future__ import annotations

import os

import torch

from mergekit_omp.kernels import calibrate
from mergekit_omp.kernels.omp_screen import BF16_MIN_SPEEDUP, bf16_matmul_is_fast


def core_counts() -> str:
    """Physical cores (psutil, where installed), logical CPUs, those this process may use,
    and torch's intra-op threads."""
    logical = os.cpu_count()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    cores = f"{physical} cores, " if physical else ""
    return (
        f"{cores}{logical} logical CPUs ({usable} usable), torch {torch.get_num_threads()} threads"
    )


def machine_lines() -> list[str]:
    """The header: CPU, torch, and the calibrated GEMM rates with the screening default."""
    rates = calibrate.machine_rates("cpu")
    ratio = rates.bfloat16_gemm / rates.float32_gemm
    screen = "on" if bf16_matmul_is_fast("cpu") else "off"
    return [
        f"machine: {calibrate.cpu_model()}; {core_counts()}",
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"calibrated GEMM: float32 {rates.float32_gemm / 1e9:.1f} GMAC/s, bfloat16 "
        f"{rates.bfloat16_gemm / 1e9:.1f} GMAC/s ({ratio:.2f}x); bfloat16 screen by default: "
        f"{screen} (needs >= {BF16_MIN_SPEEDUP}x; rates from {calibrate.calibration_path()}); "
        f"Gram row pass {rates.gram_row_pass / 1e9:.1f} G float32/s",
    ]


def print_machine() -> None:
    print("\n".join(machine_lines()), flush=True)


def omp_route(report: dict) -> str | None:
    """The report's top-level ``omp`` key (calibration and each OMP call's route), as JSON
    on one line; None for a report without one."""
    import json

    omp = report.get("omp")
    return None if omp is None else json.dumps(omp, sort_keys=True)


if __name__ == "__main__":
    print_machine()
