"""What this machine does fast: the rates OMP's plan (``kernels/omp.plan_omp``) runs on.

The screened residual route leans on bfloat16 GEMMs, fast only with AVX-512 BF16, AMX or a
GPU; on an AVX2 CPU they are several times slower than float32, and screening would make
OMP slower instead of faster. int8_gram trades GEMMs for passes over rows of the Gram
matrix, bound by memory rather than arithmetic. So the choice is made from rates measured
here, once per machine, in well under a second:

    float32_gemm     multiply-adds per second of a (256 x 512) @ (512 x 8192) float32 GEMM
    bfloat16_gemm    the same GEMM in bfloat16
    gram_row_pass    float32 elements per second that a batched row combination reads
                     (``baddbmm`` of 32 targets' 8 rows of 32,768 entries each), the inner
                     loop of int8_gram

The rates are cached per machine (CPU model, torch's CPU capability, threads, torch
version; or the GPU's name) in ``$XDG_CACHE_HOME/mergekit-omp/calibration.json`` (default
``~/.cache``), never in an output; rates measured while the CPU is busy (``cpu_is_busy``)
serve that run only. ``MERGEKIT_OMP_CALIBRATION=FILE`` reads and writes FILE
instead; a file holding one ``MachineRates`` (``machine`` and the two rates) fixes the rates
on any machine, which is how tests and reproductions pin a plan. Delete the file to measure
again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

LOG = logging.getLogger(__name__)

CALIBRATION_ENV = "MERGEKIT_OMP_CALIBRATION"
GEMM_SHAPE = (256, 512, 8192)
"""(rows, D, anchors) of the calibration GEMMs: 1.07 G multiply-adds, 13 ms at 80 GMAC/s."""
ROW_PASS_SHAPE = (32, 8, 32768)
"""(targets, rows per target, anchors) of the row-pass measurement: 8.4 M float32 read per
call from a buffer with room for twice the rows, laid out as int8_gram's chunk state (64 MB:
larger than CPU caches, as int8_gram's chunks are)."""
REPEATS = 3


class MachineRates(BaseModel):
    """Measured rates of one machine (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    machine: str
    float32_gemm: float
    bfloat16_gemm: float
    gram_row_pass: float
    seconds: float = 0.0
    """How long the measurement took."""

    def describe(self) -> str:
        return (
            f"{self.machine}: float32 GEMM {self.float32_gemm / 1e9:.0f} GMAC/s, "
            f"bfloat16 {self.bfloat16_gemm / 1e9:.0f}; Gram row pass "
            f"{self.gram_row_pass / 1e9:.1f} G float32/s"
        )


REFERENCE_RATES = MachineRates(
    machine="the calibration VM: 2-core AMD EPYC (Zen 4), AVX-512 BF16, torch 2.13.0, 2 threads",
    float32_gemm=8e10,
    bfloat16_gemm=2e11,
    gram_row_pass=1.09e10,
)
"""Rates that ``plan_omp`` assumes when it is not told a machine's."""

_MEMO: dict[tuple[str, str], MachineRates] = {}


def machine_rates(device: torch.device | str = "cpu") -> MachineRates:
    """This machine's rates: from the cache file, else measured now and cached."""
    device = torch.device(device)
    path = calibration_path()
    key = machine_key(device)
    if (str(path), key) in _MEMO:
        return _MEMO[(str(path), key)]
    stored = read_calibration(path)
    if isinstance(stored, MachineRates):
        rates = stored
    elif key in stored:
        rates = stored[key]
    else:
        rates = measure_rates(device, key)
        LOG.info("calibrated OMP routes: %s (%.2f s)", rates.describe(), rates.seconds)
        if device.type == "cpu" and cpu_is_busy():
            # Rates measured while other processes compete are this run's, not the machine's.
            LOG.info("the CPU is busy (load %.1f): the calibration is not cached", load())
        else:
            write_calibration(path, {**stored, key: rates})
    _MEMO[(str(path), key)] = rates
    return rates


BUSY_LOAD_PER_CPU = 1.5
"""A one-minute load average above this many runnable processes per CPU means the rates
measured now are not cached."""


def load() -> float:
    """The one-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def cpu_is_busy() -> bool:
    return load() > BUSY_LOAD_PER_CPU * (os.cpu_count() or 1)


def calibration_path() -> Path:
    """``MERGEKIT_OMP_CALIBRATION``, else the per-user cache file."""
    configured = os.environ.get(CALIBRATION_ENV)
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mergekit-omp" / "calibration.json"


def machine_key(device: torch.device) -> str:
    """What the rates depend on: the processor, the kernels torch picks for it, the threads."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)} | torch {torch.__version__}"
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"{cpu_model()} | {capability} | {torch.get_num_threads()} threads | "
        f"torch {torch.__version__}"
    )


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def read_calibration(path: Path) -> MachineRates | dict[str, MachineRates]:
    """One fixed ``MachineRates``, or the cached rates by machine key ({} when unreadable:
    a damaged cache is measured anew, never an error)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(data, dict) and "float32_gemm" in data:
        try:
            return MachineRates.model_validate(data)
        except ValidationError as error:
            LOG.warning("ignoring the unreadable OMP calibration in %s: %s", path, error)
            return {}
    if not isinstance(data, dict):
        LOG.warning("ignoring the unreadable OMP calibration in %s", path)
        return {}
    rates: dict[str, MachineRates] = {}
    for key, value in data.items():
        try:
            rates[key] = MachineRates.model_validate(value)
        except ValidationError:
            # An entry from an older version (a rate missing) or damaged: measured again.
            LOG.debug("re-measuring the OMP calibration of %s", key)
    return rates


def write_calibration(path: Path, rates: dict[str, MachineRates]) -> None:
    """Replace the cache file atomically; a cache that cannot be written is only logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(
            json.dumps({key: r.model_dump() for key, r in rates.items()}, indent=2) + "\n"
        )
        os.replace(staging, path)
    except OSError as error:
        LOG.warning("could not cache the OMP calibration in %s: %s", path, error)


def measure_rates(device: torch.device, key: str) -> MachineRates:
    start = time.perf_counter()
    float32 = gemm_rate(torch.float32, device)
    bfloat16 = gemm_rate(torch.bfloat16, device)
    return MachineRates(
        machine=key,
        float32_gemm=float32,
        bfloat16_gemm=bfloat16,
        gram_row_pass=row_pass_rate(device),
        seconds=round(time.perf_counter() - start, 3),
    )


def best_seconds(run, device: torch.device) -> float:
    """Fastest of ``REPEATS`` timed calls of ``run`` after one untimed warm-up."""
    run()
    best = float("inf")
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def gemm_rate(dtype: torch.dtype, device: torch.device) -> float:
    rows, dim, anchors = GEMM_SHAPE
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(rows, dim, generator=generator).to(device=device, dtype=dtype)
    right = torch.randn(anchors, dim, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(rows, anchors, dtype=dtype, device=device)
    seconds = best_seconds(lambda: torch.matmul(left, right.T, out=out), device)
    return rows * dim * anchors / seconds


def row_pass_rate(device: torch.device) -> float:
    targets, rows, anchors = ROW_PASS_SHAPE
    generator = torch.Generator().manual_seed(0)
    gram_rows = torch.randn(targets, 2 * rows, anchors, generator=generator).to(device)[:, :rows]
    weights = torch.randn(targets, 1, rows, generator=generator).to(device)
    start = torch.randn(targets, 1, anchors, generator=generator).to(device)
    out = torch.empty_like(start)
    seconds = best_seconds(
        lambda: torch.baddbmm(start, weights, gram_rows, alpha=-1, out=out), device
    )
    return targets * rows * anchors / seconds
