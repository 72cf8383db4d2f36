"""ridge, omp_ridge and hybrid: each one's defining behaviour, with exact expectations."""

from __future__ import annotations

import pytest
import tiny
import torch
from tiny import linear_world, problem_of

from mergekit_omp.approximators import ApproximationProblem, get_approximator
from mergekit_omp.approximators.fvt import BasePieces
from mergekit_omp.approximators.hybrid import fvt_anchor_combinations, fvt_weights
from mergekit_omp.approximators.ridge import fit_ridge_map
from mergekit_omp.errors import TransplantError
from mergekit_omp.vocabulary import Encoding, TokenForm, TokenKind, Vocabulary, vocabulary_of

# ---------------------------------------------------------------- ridge


def test_ridge_map_recovers_a_known_affine_map():
    anchors, targets, mapping, offset = linear_world()
    fitted = fit_ridge_map(anchors, anchors @ mapping + offset, alpha=0.0)
    assert torch.allclose(fitted.weight, mapping, atol=1e-10)
    result = get_approximator("ridge")(
        problem_of(targets, anchors, anchors @ mapping + offset), alpha=0.0
    )
    assert torch.allclose(result.rows, targets @ mapping + offset, atol=1e-10)


def test_ridge_map_is_the_same_bits_on_every_fit():
    # LAPACK's default least-squares driver (gelsy) differed in the last bits from one call
    # to the next on an AVX2 CPU (AMD EPYC Zen 3), 31 calls in 50 on this problem
    anchors, _, mapping, offset = linear_world(anchors=60, seed=0)
    base = anchors @ mapping + offset
    first = fit_ridge_map(anchors, base).weight
    assert all(torch.equal(first, fit_ridge_map(anchors, base).weight) for _ in range(50))


def test_ridge_map_of_rank_deficient_anchors_is_the_minimum_norm_solution():
    anchors = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0]], dtype=torch.float64)
    base = anchors[:, :1] * 3.0  # base = 1.5 * (a0 + a1): least norm puts 1.5 on each
    fitted = fit_ridge_map(anchors, base, alpha=0.0, center=False)
    assert torch.allclose(fitted.weight, torch.tensor([[1.5], [1.5]], dtype=torch.float64))


def test_ridge_without_centering_has_no_intercept():
    anchors, targets, mapping, offset = linear_world()
    base = anchors @ mapping  # a purely linear world: no offset to find
    fitted = fit_ridge_map(anchors, base, alpha=0.0, center=False)
    assert torch.equal(fitted.donor_mean, torch.zeros(8, dtype=torch.float64))
    assert torch.allclose(fitted.weight, mapping, atol=1e-10)
    uncentred = get_approximator("ridge")(
        problem_of(targets, anchors, anchors @ mapping + offset), alpha=0.0, center=False
    )
    assert not torch.allclose(uncentred.rows, targets @ mapping + offset, atol=1e-3)


def test_ridge_alpha_is_relative_to_the_anchor_scale_and_shrinks_towards_the_mean():
    anchors, targets, mapping, offset = linear_world()
    base = anchors @ mapping + offset
    rows = get_approximator("ridge")(problem_of(targets, anchors, base), alpha=0.5).rows
    scaled = get_approximator("ridge")(
        problem_of(targets * 100, anchors * 100, base), alpha=0.5
    ).rows
    assert torch.allclose(rows, scaled, atol=1e-10)
    assert not torch.allclose(rows, targets @ mapping + offset, atol=1e-2)
    huge = get_approximator("ridge")(problem_of(targets, anchors, base), alpha=1e6).rows
    assert torch.allclose(huge, base.mean(dim=0).expand_as(huge), atol=1e-4)


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("ridge", {"alpha": -1.0}),
        ("omp_ridge", {"k": 0}),
        ("hybrid", {"omp_error_scale": 0.0}),
        ("hybrid", {"alpha": -0.1}),
    ],
)
def test_out_of_range_parameters_are_refused(name, parameters):
    with pytest.raises(TransplantError, match=next(iter(parameters))):
        get_approximator(name).validate_parameters(parameters)


# ---------------------------------------------------------------- omp_ridge


def test_omp_ridge_is_omp_where_omp_rebuilds_the_donor_row_exactly():
    """k = 8 atoms span the 8-dimensional donor space: OMP's residual is zero."""
    anchors, targets, _, _ = linear_world()
    base = torch.randn(anchors.shape[0], 5, generator=torch.Generator().manual_seed(4))
    problem = problem_of(targets, anchors, base.double())
    plain = get_approximator("omp")(problem, k=8)
    rebuilt = torch.einsum("tk,tkd->td", plain.coeffs, anchors[plain.indices])
    assert torch.allclose(rebuilt, targets, atol=1e-10)
    with_residual = get_approximator("omp_ridge")(problem, k=8, alpha=0.1)
    assert torch.allclose(with_residual.rows, plain.rows, atol=1e-10)
    assert torch.equal(with_residual.indices, plain.indices)
    fewer = get_approximator("omp_ridge")(problem, k=4, alpha=0.1)
    assert not torch.allclose(fewer.rows, get_approximator("omp")(problem, k=4).rows, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_omp_ridge_is_exact_in_a_linear_world_for_any_k(k):
    """Y = X A: OMP's part is c X A, the mapped residual (t - c X) A; together t A, whatever
    anchors OMP picked (plain OMP is not exact with so few)."""
    anchors, targets, mapping, _ = linear_world()
    problem = problem_of(targets, anchors, anchors @ mapping)
    result = get_approximator("omp_ridge")(problem, k=k, alpha=0.0)
    assert torch.allclose(result.rows, targets @ mapping, atol=1e-9)
    plain = get_approximator("omp")(problem, k=k).rows
    assert not torch.allclose(plain, targets @ mapping, atol=1e-3)


def test_omp_ridge_rows_are_omps_plus_the_mapped_residual():
    anchors, targets, _, _ = linear_world()
    base = torch.randn(anchors.shape[0], 5, generator=torch.Generator().manual_seed(6))
    problem = problem_of(targets.float(), anchors.float(), base)
    plain = get_approximator("omp")(problem, k=5)
    result = get_approximator("omp_ridge")(problem, k=5, alpha=0.3)
    rebuilt = torch.einsum("tk,tkd->td", plain.coeffs, anchors.float()[plain.indices])
    weight = fit_ridge_map(anchors.float(), base, alpha=0.3).weight.float()
    assert torch.allclose(result.rows, plain.rows + (targets.float() - rebuilt) @ weight, atol=1e-5)


# ---------------------------------------------------------------- hybrid


@pytest.fixture(scope="module")
def byte_level_tok():
    return tiny.byte_level_tokenizer(400)


def hybrid_problem(tokenizer, words: list[bytes], exact: list[bool]) -> ApproximationProblem:
    """Every base token with bytes is an anchor; a word marked exact has as donor row the
    mean of its FVT pieces' donor rows, the others a random row."""
    base_vocab = vocabulary_of(tokenizer)
    generator = torch.Generator().manual_seed(7)
    base_matrix = torch.randn(len(tokenizer), 6, generator=generator, dtype=torch.float64)
    anchor_ids = sorted(i for i, f in base_vocab.forms.items() if f.data and i < len(tokenizer))
    donor_anchors = torch.randn(len(anchor_ids), 10, generator=generator, dtype=torch.float64)
    forms = {i: TokenForm(TokenKind.TEXT, w) for i, w in enumerate(words)}
    donor_vocab = Vocabulary(
        forms=forms,
        strings={i: repr(w) for i, w in enumerate(words)},
        special_ids={},
        encoding=Encoding.PLAIN,
    )
    problem = ApproximationProblem(
        targets=torch.randn(len(words), 10, generator=generator, dtype=torch.float64),
        donor_anchors=donor_anchors,
        base_anchors=base_matrix[anchor_ids],
        base_matrix=base_matrix,
        target_ids=list(range(len(words))),
        donor_anchor_ids=list(range(len(anchor_ids))),
        base_anchor_ids=anchor_ids,
        donor_vocab=donor_vocab,
        base_vocab=base_vocab,
        base_tokenizer=tokenizer,
        batch_size=2,
    )
    position = {base_id: j for j, base_id in enumerate(anchor_ids)}
    for row, (pieces, is_exact) in enumerate(
        zip(BasePieces(problem).batch(problem.target_ids), exact, strict=True)
    ):
        if is_exact:
            problem.targets[row] = donor_anchors[[position[i] for i in pieces]].mean(dim=0)
    return problem


def test_hybrid_picks_fvt_where_fvt_rebuilds_the_donor_row_exactly(byte_level_tok):
    words = [b" lazy dog", b"quick", b" the", b"Tokenizers"]
    problem = hybrid_problem(byte_level_tok, words, exact=[True, False, True, False])
    fvt = get_approximator("fvt")(problem).rows
    omp_ridge = get_approximator("omp_ridge")(problem, k=3).rows
    result = get_approximator("hybrid")(problem, k=3).rows
    assert all(len(p) > 1 for p in BasePieces(problem).batch([0, 1, 3]))
    for row in (0, 2):
        assert torch.allclose(result[row], fvt[row], atol=1e-9)
    for row in (1, 3):  # a random donor row: a mix, neither method's row
        assert not torch.allclose(result[row], fvt[row], atol=1e-3)
        assert not torch.allclose(result[row], omp_ridge[row], atol=1e-3)


def test_hybrid_gives_tokens_with_pieces_outside_the_anchors_omp_ridges_row(byte_level_tok):
    problem = hybrid_problem(byte_level_tok, [b" lazy dog", b"quick"], exact=[True, True])
    pieces = BasePieces(problem).batch([0])[0]
    keep = [j for j, i in enumerate(problem.base_anchor_ids) if i != pieces[0]]
    fewer = ApproximationProblem(
        **{
            **problem.__dict__,
            "donor_anchors": problem.donor_anchors[keep],
            "base_anchors": problem.base_anchors[keep],
            "donor_anchor_ids": [problem.donor_anchor_ids[j] for j in keep],
            "base_anchor_ids": [problem.base_anchor_ids[j] for j in keep],
        }
    )
    _, _, composed = fvt_anchor_combinations(fewer, "mean")
    assert composed.tolist() == [False, True]
    result = get_approximator("hybrid")(fewer, k=3).rows
    omp_ridge = get_approximator("omp_ridge")(fewer, k=3).rows
    assert torch.allclose(result[0], omp_ridge[0], atol=1e-12)
    assert torch.allclose(result[1], get_approximator("fvt")(fewer).rows[1], atol=1e-9)


def test_fvt_weight_is_inverse_squared_error():
    e_fvt = torch.tensor([0.0, 0.3, 0.4, 0.1, 0.0])
    e_omp = torch.tensor([0.2, 0.4, 0.3, 0.1, 0.0])
    composed = torch.tensor([True, True, True, False, True])
    weights = fvt_weights(e_fvt, e_omp, composed)
    assert torch.allclose(weights, torch.tensor([1.0, 0.64, 0.36, 0.0, 1.0]))


def test_hybrid_with_a_large_omp_error_scale_is_fvt_plus_its_mapped_residual(byte_level_tok):
    problem = hybrid_problem(byte_level_tok, [b"quick", b" lazy dog"], exact=[False, False])
    indices, coeffs, composed = fvt_anchor_combinations(problem, "mean")
    assert composed.all()
    rebuilt = torch.einsum("tk,tkd->td", coeffs, problem.donor_anchors[indices])
    weight = fit_ridge_map(problem.donor_anchors, problem.base_anchors, alpha=0.01).weight
    expected = get_approximator("fvt")(problem).rows + (problem.targets - rebuilt) @ weight
    result = get_approximator("hybrid")(problem, k=3, omp_error_scale=1e6).rows
    assert torch.allclose(result, expected, atol=1e-6)
    assert not torch.allclose(get_approximator("hybrid")(problem, k=3).rows, expected, atol=1e-3)
