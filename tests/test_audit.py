"""The breaker-token audit and guard (asymmetric realizability, arXiv 2601.00065).

The planted breaker: donor anchors ``p`` and ``q = p + eps e0`` are nearly collinear in the
donor space, while their base rows differ by a unit vector ``v``. The donor target ``e0``
(an ordinary unit row) is rebuilt exactly by OMP as ``(q - p) / eps``: coefficients +-1/eps,
so its base row is ``v / eps``, of norm 1/eps = 100. No other donor row has an ``e0``
component, and every other base anchor is its donor row rotated by the same orthogonal map,
so every other approximated row is as ordinary in the base as in the donor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import tiny
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.approximators import Approximation, ApproximationProblem
from mergekit_omp.cli.report import main as report_main
from mergekit_omp.cli.transplant import main as mergekit_omp_main
from mergekit_omp.diagnostics.audit import (
    MAD_TO_SD,
    AuditSettings,
    audit_rows,
    condition_positions,
    robust_scale,
    selection_condition,
)
from mergekit_omp.diagnostics.guard import TARGET_MARGIN, apply_guard
from mergekit_omp.diagnostics.records import FlaggedFor
from mergekit_omp.kernels.omp import batch_omp
from mergekit_omp.vocabulary import vocabulary_of

DIM = 16
EPS = 0.01
ANCHORS = 200
TARGETS = 40
BREAKER = 5  # position of the planted target among the targets
P, Q = 3, 7  # the nearly collinear anchors


@dataclass
class Planted:
    donor_anchors: torch.Tensor
    base_anchors: torch.Tensor
    targets: torch.Tensor
    rotation: torch.Tensor


def ordinary_rows(count: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of norm about 1 with no component along e0."""
    rows = torch.randn(count, DIM, generator=generator) / DIM**0.5
    rows[:, 0] = 0
    return rows


def planted_geometry(seed: int = 0, anchors: int = ANCHORS, targets: int = TARGETS) -> Planted:
    generator = torch.Generator().manual_seed(seed)
    donor_anchors = ordinary_rows(anchors, generator)
    rotation, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator))
    base_anchors = donor_anchors @ rotation
    donor_anchors[Q] = donor_anchors[P]
    donor_anchors[Q, 0] = EPS
    base_anchors[Q] = base_anchors[P] + rotation[0]  # v: a unit vector
    new_rows = ordinary_rows(targets, generator)
    new_rows[BREAKER] = 0
    new_rows[BREAKER, 0] = 1.0
    return Planted(donor_anchors, base_anchors, new_rows, rotation)


def planted_problem(planted: Planted) -> ApproximationProblem:
    """The planted geometry in float64, so that OMP's coefficients are exact to 1e-6."""
    vocab = vocabulary_of(tiny.byte_level_tokenizer(400))
    return ApproximationProblem(
        targets=planted.targets.double(),
        donor_anchors=planted.donor_anchors.double(),
        base_anchors=planted.base_anchors.double(),
        base_matrix=planted.base_anchors.double(),
        target_ids=list(range(ANCHORS, ANCHORS + len(planted.targets))),
        donor_anchor_ids=list(range(ANCHORS)),
        base_anchor_ids=list(range(ANCHORS)),
        donor_vocab=vocab,
        base_vocab=vocab,
    )


@pytest.fixture(scope="module")
def planted():
    planted = planted_geometry()
    problem = planted_problem(planted)
    indices, coeffs = batch_omp(problem.targets, problem.donor_anchors, 2)
    rows = problem.combine_base_anchors(indices, coeffs)
    approximation = Approximation(rows=rows, indices=indices, coeffs=coeffs)
    audit = audit_rows(problem, approximation, matrix="lm_head", is_output=True)
    return problem, approximation, audit


def expected_condition(u: torch.Tensor) -> float:
    """cond([u; u + eps e0]) for u orthogonal to e0, from the 2x2 Gram eigenvalues."""
    a = float(u.double() @ u.double())
    trace, det = 2 * a + EPS**2, a * EPS**2
    root = math.sqrt(trace**2 - 4 * det)
    return math.sqrt((trace + root) / (trace - root))


def test_omp_rebuilds_the_planted_target_from_the_collinear_pair(planted):
    problem, approximation, _ = planted
    assert set(approximation.indices[BREAKER].tolist()) == {P, Q}
    by_anchor = dict(
        zip(approximation.indices[BREAKER].tolist(), approximation.coeffs[BREAKER], strict=True)
    )
    assert by_anchor[Q].item() == pytest.approx(1 / EPS, rel=1e-6)
    assert by_anchor[P].item() == pytest.approx(-1 / EPS, rel=1e-6)


def test_the_breaker_and_only_it_is_flagged(planted):
    problem, approximation, audit = planted
    assert audit.flagged.nonzero().flatten().tolist() == [BREAKER]
    assert audit.breakers.nonzero().flatten().tolist() == [BREAKER]
    assert audit.flagged_norm[BREAKER] and audit.flagged_salience[BREAKER]
    assert audit.base_norm[BREAKER].item() == pytest.approx(1 / EPS, rel=1e-6)
    assert audit.donor_norm[BREAKER].item() == pytest.approx(1.0)
    assert abs(audit.donor_z[BREAKER].item()) < 3  # ordinary in the donor
    assert audit.residual[BREAKER].item() < 1e-9  # rebuilt exactly
    assert audit.coeff_l1[BREAKER].item() == pytest.approx(2 / EPS, rel=1e-6)
    assert audit.condition[BREAKER].item() == pytest.approx(
        expected_condition(problem.donor_anchors[P]), rel=1e-6
    )
    others = torch.arange(TARGETS) != BREAKER
    assert audit.base_z[others].max() < 3
    assert audit.salience.wins[BREAKER] > 0.3 * audit.salience.samples
    assert audit.salience.wins[BREAKER] > audit.salience.real_max_wins


def test_the_bound_is_median_plus_z_max_robust_sd_of_the_real_rows(planted):
    problem, _, audit = planted
    norms = problem.base_anchors.double().norm(dim=1)
    median = norms.quantile(0.5)
    mad = (norms - median).abs().quantile(0.5)
    spread = max(MAD_TO_SD * mad, median * 3 / 16)  # the floor: nothing under 2.5x the median
    assert audit.bound == pytest.approx((median + 8.0 * spread).item())
    assert audit.base_z[BREAKER].item() == pytest.approx(
        ((1 / EPS - median) / spread).item(), rel=1e-3
    )


def test_report_lists_the_breaker_first(planted):
    problem, _, audit = planted
    summary = audit.record(problem.donor_vocab)
    assert summary.flagged == summary.breakers == 1
    assert summary.flagged_for == FlaggedFor(base_norm=1, salience=1)
    (record,) = summary.flagged_tokens
    assert record.id == problem.target_ids[BREAKER]
    assert record.flagged_for == ["base_norm", "salience"] and record.breaker
    assert summary.worst[0] == record
    assert summary.base_norm.real_rows_above_bound == 0
    json.dumps(summary.model_dump(mode="json"))  # plain JSON


def test_clip_rescales_only_the_breaker_to_the_bound(planted):
    problem, approximation, audit = planted
    outcome = apply_guard(problem, approximation, audit, "clip")
    rows = outcome.approximation.rows
    assert outcome.changed.nonzero().flatten().tolist() == [BREAKER]
    assert rows[BREAKER].norm().item() == pytest.approx(audit.bound * (1 - TARGET_MARGIN), rel=1e-6)
    cosine = torch.nn.functional.cosine_similarity(
        rows[BREAKER], approximation.rows[BREAKER], dim=0
    )
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)
    others = torch.arange(TARGETS) != BREAKER
    assert torch.equal(rows[others], approximation.rows[others])
    assert not audit.with_rows(problem, rows).flagged.any()


def test_shrink_refits_the_breaker_with_the_smallest_ridge_that_bounds_it(planted):
    problem, approximation, audit = planted
    outcome = apply_guard(problem, approximation, audit, "shrink")
    rows, coeffs = outcome.approximation.rows, outcome.approximation.coeffs
    assert outcome.changed.nonzero().flatten().tolist() == [BREAKER]
    norm = rows[BREAKER].double().norm().item()
    assert norm <= audit.bound
    assert norm == pytest.approx(audit.bound, rel=1e-3)  # the smallest sufficient penalty
    # the row is its new coefficients applied to the same base anchors
    selected = approximation.indices[BREAKER]
    assert torch.allclose(
        rows[BREAKER], coeffs[BREAKER] @ problem.base_anchors[selected], atol=1e-5
    )
    # and those coefficients solve the ridge problem (A A^T + lam I) c = A t
    donor = problem.donor_anchors[selected].double()
    (penalty,) = outcome.ridge.tolist()
    lhs = (donor @ donor.T + penalty * torch.eye(2, dtype=torch.float64)) @ coeffs[BREAKER].double()
    assert torch.allclose(lhs, donor @ problem.targets[BREAKER].double(), atol=1e-6)
    assert coeffs[BREAKER].abs().sum() < approximation.coeffs[BREAKER].abs().sum() / 10
    others = torch.arange(TARGETS) != BREAKER
    assert torch.equal(rows[others], approximation.rows[others])
    assert torch.equal(coeffs[others], approximation.coeffs[others])


def test_off_changes_nothing(planted):
    problem, approximation, audit = planted
    outcome = apply_guard(problem, approximation, audit, "off")
    assert outcome.approximation is approximation
    assert not outcome.changed.any()


def test_methods_without_coefficients_get_norm_and_salience_and_shrink_clips(planted):
    problem, approximation, _ = planted
    bare = Approximation(rows=approximation.rows)
    audit = audit_rows(problem, bare, matrix="embed", is_output=False)
    assert audit.residual is None and audit.coeff_l1 is None and audit.condition is None
    assert audit.salience is None
    assert audit.flagged.nonzero().flatten().tolist() == [BREAKER]
    outcome = apply_guard(problem, bare, audit, "shrink")
    assert "clipped" in outcome.note
    assert outcome.approximation.rows[BREAKER].norm().item() <= audit.bound


def test_robust_scale_of_known_values():
    scale = robust_scale(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]), min_relative_spread=0.0)
    assert (scale.median, scale.spread) == (3.0, pytest.approx(MAD_TO_SD))
    assert scale.z(torch.tensor([100.0])).item() == pytest.approx(97 / MAD_TO_SD)
    # rows of one length (MAD 0): the spread falls back to 1% of the median
    assert robust_scale(torch.full((9,), 2.0), min_relative_spread=0.01).spread == 0.02


def test_condition_of_known_anchors_ignores_anchors_without_weight():
    anchors = torch.tensor([[[1.0, 0, 0], [0, 10.0, 0], [0, 10.0, 0]]])  # third: duplicate
    assert selection_condition(anchors[:, :2], torch.tensor([[True, True]])).item() == 10.0
    active = torch.tensor([[True, True, False]])
    assert selection_condition(anchors, active).item() == pytest.approx(10.0)
    singular = selection_condition(anchors, torch.ones(1, 3, dtype=torch.bool)).item()
    assert singular >= 1e15
    assert selection_condition(anchors, torch.zeros(1, 3, dtype=torch.bool)).item() == 1.0


def test_conditioning_is_sampled_plus_every_listed_row(planted):
    problem, approximation, _ = planted
    settings = AuditSettings(condition_sample=5, top=2)
    audit = audit_rows(problem, approximation, matrix="embed", is_output=False, settings=settings)
    measured = (~audit.condition.isnan()).nonzero().flatten()
    listed = set(audit.listed_positions().tolist())
    assert BREAKER in listed and listed <= set(measured.tolist())
    assert len(measured) <= 5 + len(listed)
    assert audit.record(problem.donor_vocab).condition_measured == len(measured)


# A whole transplant with the breaker planted in tiny models.


def planted_models(root) -> tuple[str, str, int]:
    """Tied tiny models holding the planted geometry; returns (base, donor, breaker id)."""
    donor_tok, base_tok = tiny.byte_level_tokenizer(400), tiny.byte_level_tokenizer(300)
    donor_vocab, base_vocab = vocabulary_of(donor_tok), vocabulary_of(base_tok)
    base_id_of = {form: i for i, form in base_vocab.forms.items()}
    shared = [d for d, form in sorted(donor_vocab.forms.items()) if form in base_id_of]
    new = [d for d in sorted(donor_vocab.forms) if donor_vocab.forms[d] not in base_id_of]
    planted = planted_geometry(seed=1, anchors=len(shared), targets=len(new))
    donor_embed = torch.zeros(len(donor_tok), DIM)
    base_embed = torch.zeros(len(base_tok), DIM)
    for j, donor_id in enumerate(shared):
        donor_embed[donor_id] = planted.donor_anchors[j]
        base_embed[base_id_of[donor_vocab.forms[donor_id]]] = planted.base_anchors[j]
    donor_embed[torch.tensor(new)] = planted.targets
    base = tiny.tiny_llama(base_tok, root / "base", hidden_size=DIM, tied=True, embed=base_embed)
    donor = tiny.tiny_llama(
        donor_tok, root / "donor", hidden_size=DIM, tied=True, embed=donor_embed
    )
    return str(base), str(donor), new[BREAKER]


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    return planted_models(tmp_path_factory.mktemp("planted"))


@pytest.mark.parametrize("guard", ["off", "clip", "shrink"])
def test_transplant_flags_the_planted_breaker_and_the_guard_bounds_it(planted_pair, guard):
    base, donor, breaker = planted_pair
    options = TransplantOptions(
        base_model=base, donor=donor, method="omp", parameters={"k": 2}, guard=guard
    )
    result = transplant(options, progress=False)
    audit = result.report.diagnostics.audit["embed"]
    assert audit.guard is not None
    assert [r.id for r in audit.flagged_tokens] == [breaker]
    assert audit.flagged_tokens[0].breaker
    assert audit.guard.mode == guard
    bound = result.matrices["embed"].diagnosis.audit.bound
    norm = result.matrices["embed"].matrix[breaker].norm().item()
    (warning,) = [w for w in result.report.warnings if w.startswith("embed:")]
    if guard == "off":
        assert norm == pytest.approx(1 / EPS, rel=1e-2)  # float32 OMP on a cond-1e4 Gram
        assert warning.endswith("--guard clip or shrink bounds them")
        assert audit.guard.rows_changed == 0
    else:
        assert bound * 0.999 <= norm <= bound
        assert audit.guard.rows_changed == 1 and audit.guard.still_flagged == 0
        assert f"--guard {guard} bounded 1" in warning
    assert "BREAKER" in result.report.summary(verbose=True)


def test_guard_flag_reaches_the_written_model(planted_pair, tmp_path):
    base, donor, breaker = planted_pair
    report = tmp_path / "report.json"
    args = [
        base,
        donor,
        str(tmp_path / "out"),
        "-a",
        "omp",
        "-k",
        "2",
        "--guard",
        "clip",
        "--report",
        str(report),
    ]
    result = CliRunner().invoke(mergekit_omp_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["options"]["guard"] == "clip"
    bound = data["diagnostics"]["audit"]["embed"]["base_norm"]["bound"]
    written = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"]
    assert written[breaker].norm().item() == pytest.approx(bound, rel=1e-3)


def test_report_command_writes_no_model(planted_pair, tmp_path):
    base, donor, breaker = planted_pair
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        report_main,
        [base, donor, "-a", "omp", "-k", "2", "--json", str(report)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "audit embed: " in result.output and "BREAKER" in result.output
    assert "numbers: MISMATCHED" in result.output  # 300-token base: digits only
    data = json.loads(report.read_text())
    assert [r["id"] for r in data["diagnostics"]["audit"]["embed"]["flagged_tokens"]] == [breaker]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_report_command_plots_the_distributions(planted_pair, tmp_path):
    pytest.importorskip("matplotlib")
    base, donor, _ = planted_pair
    png = tmp_path / "audit.png"
    result = CliRunner().invoke(
        report_main,
        [base, donor, "-a", "omp", "-k", "2", "--plot", str(png)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_clear_error(planted_pair, tmp_path, monkeypatch):
    base, donor, _ = planted_pair
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    result = CliRunner().invoke(report_main, [base, donor, "--plot", str(tmp_path / "a.png")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: --plot needs matplotlib: pip install 'mergekit-omp[plot]' (or matplotlib)"
    )


def test_conditioning_sample_shrinks_with_the_support_width() -> None:
    settings = AuditSettings(condition_sample=4096)
    listed = torch.tensor([3, 9998])
    narrow = condition_positions(10_000, listed, settings, k=64, dim=640)
    assert 4096 <= len(narrow) <= 4098 and torch.isin(listed, narrow).all()
    # FOCUS-like supports: 512 anchors cost (512/64)^2 (512+640)/(64+640) = 105x a row of OMP's.
    wide = condition_positions(10_000, listed, settings, k=512, dim=640)
    assert 39 <= len(wide) <= 41 and torch.isin(listed, wide).all()
    assert len(condition_positions(30, listed[:1], settings, k=64, dim=640)) == 30
