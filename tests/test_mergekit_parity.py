"""mergekit-omp against mergekit-tokensurgeon, the oracle, where both match the same tokens."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from mergekit.scripts.tokensurgeon import main as tokensurgeon_main
from tiny import load_tensors

from mergekit_omp.cli.transplant import main as mergekit_omp_main

MATRICES = ("model.embed_tokens.weight", "lm_head.weight")


def run(command, args: list[str]) -> None:
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "extra",
    [["-a", "omp", "-k", "8"], ["-a", "omp", "-k", "3", "--batch-size", "7", "-nvs", "0.5"]],
    ids=["k8", "k3-batched-scaled"],
)
def test_same_rows_as_mergekit_tokensurgeon(byte_level_pair, tmp_path, extra):
    base, donor = byte_level_pair
    run(tokensurgeon_main, [str(base), str(donor), str(tmp_path / "mergekit"), *extra])
    # the breaker-token guard deliberately changes outlier rows; off, the rows are mergekit's
    run(
        mergekit_omp_main, [str(base), str(donor), str(tmp_path / "ours"), *extra, "--guard", "off"]
    )
    theirs = load_tensors(tmp_path / "mergekit")
    ours = load_tensors(tmp_path / "ours")
    for name in MATRICES:
        assert theirs[name].shape == ours[name].shape
        relative = (theirs[name] - ours[name]).norm() / theirs[name].norm()
        assert relative < 1e-4, name
        rows = (theirs[name] - ours[name]).norm(dim=1) / theirs[name].norm(dim=1).clamp_min(1e-12)
        assert rows.max() < 1e-4, name


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_baselines_match_mergekit(byte_level_pair, tmp_path, method):
    base, donor = byte_level_pair
    run(tokensurgeon_main, [str(base), str(donor), str(tmp_path / "mergekit"), "-a", method])
    run(mergekit_omp_main, [str(base), str(donor), str(tmp_path / "ours"), "-a", method])
    theirs, ours = load_tensors(tmp_path / "mergekit"), load_tensors(tmp_path / "ours")
    for name in MATRICES:
        assert torch.allclose(theirs[name], ours[name], atol=1e-6)
