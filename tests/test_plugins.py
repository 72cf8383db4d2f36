"""Third-party approximators arrive through the `mergekit_omp.approximators` entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_omp.approximators import approximator_names, get_approximator
from mergekit_omp.errors import TransplantError

PLUGIN = Path(__file__).parent / "fixtures" / "plugin"


def test_builtins_are_registered_through_entry_points():
    assert {"omp", "zero", "mean"} <= set(approximator_names())
    omp = get_approximator("omp")
    assert omp.parameter_names() == ["k", "memory_gb", "screen"]
    assert omp.reference_url == "https://arxiv.org/abs/2506.06607"
    assert omp.validate_parameters({}) == {"k": 64, "memory_gb": None, "screen": None}


def test_parameters_are_typed():
    omp = get_approximator("omp")
    assert omp.validate_parameters({"k": "8"}) == {"k": 8, "memory_gb": None, "screen": None}
    assert omp.validate_parameters({"screen": "false"})["screen"] is False
    with pytest.raises(TransplantError, match="k"):
        omp.validate_parameters({"k": "many"})
    with pytest.raises(TransplantError, match="unknown_thing"):
        omp.validate_parameters({"unknown_thing": 1})


def test_unknown_method_is_a_clear_error():
    with pytest.raises(TransplantError, match="unknown approximation method 'nope'"):
        get_approximator("nope")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
    )
    return target


def run_cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from mergekit_omp.cli.process import mergekit_omp; mergekit_omp()",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_installed_plugin_appears_and_runs(plugin_site, mixed_pair, tmp_path):
    base, donor = mixed_pair
    help_text = run_cli(plugin_site, "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "scaled_mean" in help_text.stdout
    out = tmp_path / "out"
    run = run_cli(
        plugin_site, str(base), str(donor), str(out), "-a", "scaled_mean", "-p", "factor=3"
    )
    assert run.returncode == 0, run.stderr
    assert "Wrote " in run.stderr  # the summary, flushed before the process ends
    base_embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    new_embed = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    from mergekit_omp import TransplantOptions, transplant

    new_ids = (
        transplant(
            TransplantOptions(base_model=str(base), donor=str(donor), method="zero"), progress=False
        )
        .matrices["embed"]
        .match.new_tokens
    )
    expected = base_embed.mean(dim=0) * 3
    assert torch.allclose(new_embed[new_ids], expected.expand(len(new_ids), -1), atol=1e-6)


def test_without_the_plugin_the_method_is_refused(mixed_pair, tmp_path):
    base, donor = mixed_pair
    run = run_cli(Path(tmp_path), str(base), str(donor), str(tmp_path / "out"), "-a", "scaled_mean")
    assert run.returncode == 1
    assert run.stderr.strip().startswith("Error: unknown approximation method 'scaled_mean'")
    assert len(run.stderr.strip().splitlines()) == 1
