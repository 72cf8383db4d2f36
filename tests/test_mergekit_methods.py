"""mergekit-tokensurgeon's methods we do not implement ourselves run mergekit's own code:
every ``-a`` value of mergekit-tokensurgeon 0.1.5 gives its rows (or, for random methods,
its draws), checked against ``mergekit-tokensurgeon`` itself on the tiny byte-level pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mergekit.scripts.tokensurgeon import ApproximationMethod, john_hewitt_init
from mergekit.scripts.tokensurgeon import main as tokensurgeon_main
from tiny import load_tensors
from transformers import LlamaConfig

from mergekit_omp.approximators import ApproximationProblem, approximator_names, get_approximator
from mergekit_omp.approximators.mergekit_methods import rope_geometry
from mergekit_omp.cli.transplant import main as mergekit_omp_main
from mergekit_omp.vocabulary import Encoding, Vocabulary

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def run(command, args: list[str]) -> None:
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def both(pair, tmp_path: Path, args: list[str]) -> tuple[dict, dict]:
    """The tensors mergekit-tokensurgeon and mergekit-omp write for the same arguments."""
    base, donor = (str(p) for p in pair)
    run(tokensurgeon_main, [base, donor, str(tmp_path / "mergekit"), *args])
    run(mergekit_omp_main, [base, donor, str(tmp_path / "ours"), *args])
    return load_tensors(tmp_path / "mergekit"), load_tensors(tmp_path / "ours")


def worst_row_error(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    assert theirs.shape == ours.shape
    errors = (theirs - ours).norm(dim=1) / theirs.norm(dim=1).clamp_min(1e-12)
    return errors.max().item()


def rows_as_a_set(matrix: torch.Tensor) -> torch.Tensor:
    return matrix[torch.argsort(matrix[:, 0])]


@pytest.fixture
def mergekit_reads_rope_theta(monkeypatch):
    """mergekit's mp_rope reads ``config.rope_theta``, which transformers 5 configs lack
    (``rope_parameters``); give it the attribute so mergekit's own command can run."""
    monkeypatch.setattr(
        LlamaConfig,
        "rope_theta",
        property(lambda self: self.rope_parameters["rope_theta"]),
        raising=False,
    )


def test_every_tokensurgeon_method_is_a_method():
    assert {m.value for m in ApproximationMethod} <= set(approximator_names())


@pytest.mark.parametrize(
    "args",
    [
        ["-a", "common_interpolation"],
        ["-a", "common_interpolation", "-c", "-k", "8"],
        # barycentric and least-squares weights are unique only with k <= the width (32)
        ["-a", "common_interpolation", "-w", "barycentric", "-k", "16"],
        ["-a", "common_interpolation", "-w", "least_squares", "-k", "4", "--batch-size", "9"],
        ["-a", "mp_rope", "-k", "4"],
    ],
    ids=["interpolation", "cosine-k8", "barycentric", "least-squares-batched", "mp_rope"],
)
def test_deterministic_methods_give_mergekits_rows(
    byte_level_pair, tmp_path, args, mergekit_reads_rope_theta
):
    theirs, ours = both(byte_level_pair, tmp_path, args)
    # barycentric weights solve a 16 x 16 float32 system: its conditioning magnifies the
    # rounding of a different summation order (thread count) to about 1e-4
    tolerance = 1e-3 if "barycentric" in args else 1e-4
    for name in (EMBED, LM_HEAD):
        assert worst_row_error(theirs[name], ours[name]) < tolerance, name


def test_landmark_pca_gives_mergekits_rows(byte_level_pair, tmp_path):
    """Its PCA is randomised: the input embeddings are drawn first in both tools, from the
    same seed (mergekit's LM head continues that stream; ours is seeded with seed + 1)."""
    theirs, ours = both(byte_level_pair, tmp_path, ["-a", "landmark_pca", "--random-seed", "5"])
    assert worst_row_error(theirs[EMBED], ours[EMBED]) < 1e-4
    assert ours[LM_HEAD].isfinite().all()


@pytest.mark.parametrize("method", ["randn", "john_hewitt"])
def test_random_methods_draw_mergekits_rows(byte_level_pair, tmp_path, method):
    """The same draws from the same seed. mergekit hands them to new tokens in its
    tokenizer's hash-map order and ours in id order, so rows are compared as sets."""
    args = ["-a", method, "--random-seed", "5", "--batch-size", "10"]
    theirs, ours = both(byte_level_pair, tmp_path, args)
    assert torch.equal(rows_as_a_set(theirs[EMBED]), rows_as_a_set(ours[EMBED]))
    assert not torch.equal(theirs[EMBED], ours[EMBED])  # so the set comparison is needed


def random_problem(targets: int, anchors: int, seed: int) -> ApproximationProblem:
    """Random targets (width 8) and anchors (width 6 in the base); the base matrix is the
    base anchors."""
    generator = torch.Generator().manual_seed(seed)
    empty = Vocabulary(forms={}, strings={}, special_ids={}, encoding=Encoding.PLAIN)
    base_anchors = torch.randn(anchors, 6, generator=generator)
    return ApproximationProblem(
        targets=torch.randn(targets, 8, generator=generator),
        donor_anchors=torch.randn(anchors, 8, generator=generator),
        base_anchors=base_anchors,
        base_matrix=base_anchors,
        target_ids=list(range(targets)),
        donor_anchor_ids=list(range(anchors)),
        base_anchor_ids=list(range(anchors)),
        donor_vocab=empty,
        base_vocab=empty,
    )


def test_random_methods_are_seeded_and_leave_the_global_generator_alone():
    problem = random_problem(targets=300, anchors=50, seed=1)
    state = torch.random.get_rng_state()
    first = get_approximator("randn")(problem).rows
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, get_approximator("randn")(problem).rows)
    other_seed = problem.__class__(**{**problem.__dict__, "seed": 1})
    assert not torch.equal(first, get_approximator("randn")(other_seed).rows)
    assert abs(first.mean().item()) < 0.1 and abs(first.std().item() - 1) < 0.1


def test_john_hewitt_falls_back_where_mergekit_raises():
    """Fewer base rows than dimensions: the covariance is singular. mergekit's intended
    fallback (small normal rows) fails with a TypeError; ours draws them."""
    problem = random_problem(targets=20, anchors=4, seed=2)  # 4 base rows of width 6
    with pytest.raises(TypeError):
        john_hewitt_init(problem.base_matrix, 20)
    rows = get_approximator("john_hewitt")(problem).rows
    assert rows.shape == (20, 6)
    assert 0.01 < rows.std().item() < 0.03


def test_stb_is_refused_before_anything_is_read(tmp_path):
    result = CliRunner().invoke(
        mergekit_omp_main, ["no/such-base", "no/such-donor", str(tmp_path / "out"), "-a", "stb"]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "broken in mergekit-tokensurgeon 0.1.5" in lines[0]
    assert not (tmp_path / "out").exists()


def test_mergekits_own_stb_is_broken(byte_level_pair, tmp_path):
    """The reason for the refusal above: if mergekit fixes it, wrap it like the others."""
    base, donor = (str(p) for p in byte_level_pair)
    with pytest.raises(TypeError, match="TokenSurgeonOptions"):
        CliRunner().invoke(
            tokensurgeon_main,
            [base, donor, str(tmp_path / "m"), "-a", "stb"],
            catch_exceptions=False,
        )


def test_rope_theta_from_transformers_5_configs():
    config = LlamaConfig(
        num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
    )
    assert rope_geometry(config, "base") == (4, 500000.0)
