"""The machine calibration the OMP plan is made from: measured once, cached, overridable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mergekit_omp.kernels import calibrate, omp_screen
from mergekit_omp.kernels.calibrate import MachineRates, machine_key, machine_rates

FIXED = MachineRates(machine="fixed", float32_gemm=8e10, bfloat16_gemm=2e11, gram_row_pass=7e9)


@pytest.fixture
def calibration_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache" / "calibration.json"
    monkeypatch.setenv(calibrate.CALIBRATION_ENV, str(path))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(calibrate, "load", lambda: 0.0)  # an idle CPU, whatever runs beside
    omp_screen.bf16_matmul_is_fast.cache_clear()
    yield path
    omp_screen.bf16_matmul_is_fast.cache_clear()


def counting_measure(monkeypatch: pytest.MonkeyPatch, rates: MachineRates) -> list[str]:
    calls: list[str] = []

    def measure(device: torch.device, key: str) -> MachineRates:
        calls.append(key)
        return rates.model_copy(update={"machine": key})

    monkeypatch.setattr(calibrate, "measure_rates", measure)
    return calls


def test_measured_rates_are_positive_and_quick() -> None:
    rates = calibrate.measure_rates(torch.device("cpu"), "this machine")
    assert rates.float32_gemm > 0 and rates.bfloat16_gemm > 0 and rates.gram_row_pass > 0
    assert rates.seconds < 10  # well under a second when idle; a loaded CI machine is slower


def test_rates_are_measured_once_and_cached_per_machine(
    calibration_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_measure(monkeypatch, FIXED)
    key = machine_key(torch.device("cpu"))
    assert machine_rates("cpu").machine == key
    assert calls == [key]
    cached = json.loads(calibration_file.read_text())
    assert list(cached) == [key] and cached[key]["float32_gemm"] == 8e10
    monkeypatch.setattr(calibrate, "_MEMO", {})  # a new process reads the file
    assert machine_rates("cpu").float32_gemm == 8e10
    assert calls == [key]


def test_rates_measured_on_a_busy_cpu_are_not_cached(
    calibration_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_measure(monkeypatch, FIXED)
    monkeypatch.setattr(calibrate, "load", lambda: 1.6 * (os.cpu_count() or 1))
    assert machine_rates("cpu").float32_gemm == 8e10 and len(calls) == 1
    assert not calibration_file.exists()
    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(calibrate, "load", lambda: 0.0)
    machine_rates("cpu")
    assert len(calls) == 2 and calibration_file.exists()


def test_other_machines_keep_their_cached_rates(
    calibration_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calibration_file.parent.mkdir(parents=True)
    other = FIXED.model_copy(update={"machine": "other"})
    calibration_file.write_text(json.dumps({"other CPU": other.model_dump()}))
    counting_measure(monkeypatch, FIXED)
    machine_rates("cpu")
    assert set(json.loads(calibration_file.read_text())) == {
        "other CPU",
        machine_key(torch.device("cpu")),
    }


def test_a_damaged_cache_is_measured_again(
    calibration_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calibration_file.parent.mkdir(parents=True)
    calibration_file.write_text("{not json")
    calls = counting_measure(monkeypatch, FIXED)
    assert machine_rates("cpu").float32_gemm == 8e10 and len(calls) == 1
    calibration_file.write_text(json.dumps({"x": {"float32_gemm": "fast"}}))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    machine_rates("cpu")
    assert len(calls) == 2


def test_rates_cached_without_a_newer_rate_are_measured_again(
    calibration_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache written before gram_row_pass existed: this machine's entry is measured anew,
    the other machines' entries that are complete are kept."""
    calibration_file.parent.mkdir(parents=True)
    key = machine_key(torch.device("cpu"))
    old = {"machine": key, "float32_gemm": 8e10, "bfloat16_gemm": 2e11}
    other = FIXED.model_copy(update={"machine": "other"}).model_dump()
    calibration_file.write_text(json.dumps({key: old, "other CPU": other}))
    calls = counting_measure(monkeypatch, FIXED)
    assert machine_rates("cpu").gram_row_pass == 7e9 and calls == [key]
    assert json.loads(calibration_file.read_text())["other CPU"] == other


def test_a_file_of_one_machines_rates_fixes_them_anywhere(
    calibration_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calibration_file.parent.mkdir(parents=True)
    calibration_file.write_text(json.dumps(FIXED.model_dump()))
    calls = counting_measure(monkeypatch, FIXED)
    assert machine_rates("cpu") == FIXED
    assert calls == []


@pytest.mark.parametrize("bfloat16, screens", [(2e11, True), (1.2e11, True), (2.4e10, False)])
def test_screening_is_the_default_only_where_bfloat16_measured_fast(
    calibration_file: Path, bfloat16: float, screens: bool
) -> None:
    """AVX-512 BF16 measures 2.5x float32's rate; AVX2 alone 0.3x, where screening would
    make OMP three times slower (docs/performance.md)."""
    calibration_file.parent.mkdir(parents=True)
    rates = FIXED.model_copy(update={"bfloat16_gemm": bfloat16})
    calibration_file.write_text(json.dumps(rates.model_dump()))
    assert omp_screen.bf16_matmul_is_fast("cpu") is screens
    assert omp_screen.bf16_matmul_is_fast("cuda") is True


def test_the_default_budget_is_a_ceiling_near_the_inputs_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SmolLM2 <- Gemma-3 (216,122 targets, 46,018 anchors, D = 640): the 8.5 GB float32 Gram
    matrix fits half of 24 GiB but not the default ceiling (4x the 0.67 GB inputs); the
    2.1 GB int8 one does, and it is the fastest. A larger budget is not a reason to take a
    slower route: with 12 GiB int8_gram still runs."""
    from mergekit_omp.kernels import omp

    monkeypatch.setattr(omp, "default_memory_budget", lambda device: 12 * 1024**3)
    cpu = torch.device("cpu")
    inputs = (216122 + 46018) * 640 * 4
    plan = omp.plan_call(216122, 46018, 640, 16, torch.float32, cpu, screen=False)
    assert plan.strategy == "int8_gram" and plan.working_bytes <= 4 * inputs
    larger = omp.plan_call(
        216122, 46018, 640, 16, torch.float32, cpu, memory_budget_bytes=12 * 1024**3, screen=False
    )
    assert (larger.strategy, larger.chunk_tokens) == (plan.strategy, plan.chunk_tokens)
    assert "full_gram" in dict(larger.estimated_seconds)  # it fits, but is slower
    tight = omp.plan_call(
        216122, 46018, 640, 16, torch.float32, cpu, memory_budget_bytes=2 * 1024**3, screen=False
    )
    assert tight.strategy == "residual" and tight.working_bytes <= 2 * 1024**3
    monkeypatch.setattr(omp, "default_memory_budget", lambda device: 300 * 1024**2)
    assert omp.plan_call(2048, 16000, 1024, 64, torch.float32, cpu).working_bytes <= 300 * 1024**2
