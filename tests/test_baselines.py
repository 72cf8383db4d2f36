"""The baseline approximators: each one's defining behaviour, with exact expectations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import tiny
import torch
from tiny import problem_of

from mergekit_omp.approximators import ApproximationProblem, get_approximator
from mergekit_omp.approximators.focus import sparse_sparsemax, sparsemax
from mergekit_omp.approximators.fvt import BasePieces, utf8_segments
from mergekit_omp.errors import TransplantError
from mergekit_omp.vocabulary import (
    Encoding,
    TokenForm,
    TokenKind,
    Vocabulary,
    vocabulary_of,
)


def unit_circle(angles_degrees: list[float]) -> torch.Tensor:
    radians = torch.tensor(angles_degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def random_problem(targets: int = 37, anchors: int = 50, seed: int = 0, **fields):
    generator = torch.Generator().manual_seed(seed)
    return problem_of(
        torch.randn(targets, 8, generator=generator),
        torch.randn(anchors, 8, generator=generator),
        torch.randn(anchors, 6, generator=generator),
        **fields,
    )


# ---------------------------------------------------------------- sparsemax / FOCUS


def test_sparsemax_of_known_vectors():
    scores = torch.tensor(
        [[0.5, 0.3, 0.1, 0.0], [1.0, 0.8, 0.1, 0.0], [0.0, 1.0, 2.0, 0.5], [0.9, 0.2, 0.1, -0.5]],
        dtype=torch.float64,
    )
    fifteenth = 1 / 15
    expected = torch.tensor(
        [
            [0.5 + 0.1 / 4, 0.3 + 0.1 / 4, 0.1 + 0.1 / 4, 0.1 / 4],  # support 4, tau = -0.1/4
            [0.6, 0.4, 0.0, 0.0],  # support 2, tau = 0.4
            [0.0, 0.0, 1.0, 0.0],  # support 1
            [0.9 - fifteenth, 0.2 - fifteenth, 0.1 - fifteenth, 0.0],  # support 3
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(sparsemax(scores), expected, atol=1e-12)
    assert (sparsemax(scores)[1:, 3] == 0.0).all()


def test_sparsemax_is_the_projection_onto_the_simplex():
    """Weights sum to 1, are sparse, and satisfy the projection's optimality conditions."""
    scores = torch.randn(200, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = sparsemax(scores)
    assert torch.allclose(weights.sum(dim=1), torch.ones(200, dtype=torch.float64), atol=1e-12)
    assert (weights >= 0).all()
    support = weights > 0
    assert support.sum(dim=1).max() < 300 // 4  # sparse
    # KKT: on the support w = z - tau with one tau per row; off it z <= tau.
    tau = ((scores - weights) * support).sum(dim=1) / support.sum(dim=1)
    assert torch.allclose((scores - weights)[support], tau.expand(300, -1).T[support], atol=1e-12)
    assert (scores[~support] <= tau.expand(300, -1).T[~support] + 1e-12).all()


@pytest.mark.parametrize("initial_width", [1, 3, 64])
def test_partial_sort_sparsemax_equals_the_full_one(initial_width):
    """Sorting only the top scores, widened until every support fits, changes nothing."""
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(40, 500, generator=generator, dtype=torch.float64) * 0.01
    scores[::3] *= 200  # some rows with small supports, others with wide ones
    scores[:, 7] = float("-inf")
    indices, coeffs = sparse_sparsemax(scores, initial_width=initial_width)
    dense = torch.zeros_like(scores).scatter_add_(1, indices, coeffs)
    full = sparsemax(scores)
    assert torch.allclose(dense, full, atol=1e-12)
    assert indices.shape[1] == int((full > 0).sum(dim=1).max())
    assert (full > 0).sum(dim=1).max() > 64 > (full > 0).sum(dim=1).min()


def test_sparsemax_gives_minus_infinity_no_weight():
    weights = sparsemax(torch.tensor([[0.2, float("-inf"), 0.1]]))
    assert torch.allclose(weights, torch.tensor([[0.55, 0.0, 0.45]]))


def test_focus_weights_are_sparsemax_of_cosine_similarity():
    donor_anchors = torch.eye(4, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    base_anchors = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    targets = torch.tensor(
        [[5.0, 0, 0, 0], [1.0, 1.0, 0, 0], [3.0, 2.0, 1.0, 0]], dtype=torch.float64
    )
    result = get_approximator("focus")(problem_of(targets, donor_anchors, base_anchors))
    similarity = targets / targets.norm(dim=1, keepdim=True)  # anchors are the unit axes
    weights = sparsemax(similarity)
    assert torch.allclose(weights[0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(weights[1], torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    assert torch.allclose(result.rows, weights @ base_anchors)
    dense = torch.zeros_like(weights).scatter_add_(1, result.indices, result.coeffs)
    assert torch.allclose(dense, weights)
    assert torch.allclose(result.coeffs.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_focus_ignores_anchors_with_zero_donor_rows():
    donor_anchors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    base_anchors = torch.tensor([[100.0], [1.0], [2.0]])
    targets = torch.tensor([[-1.0, -1.0]])  # cosine -0.7 to both: the zero anchor would win
    result = get_approximator("focus")(problem_of(targets, donor_anchors, base_anchors))
    assert torch.allclose(result.rows, torch.tensor([[1.5]]))


def test_focus_falls_back_to_a_seeded_normal_sample_of_the_base_rows():
    generator = torch.Generator().manual_seed(3)
    base_matrix = torch.randn(500, 4, generator=generator) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 7
    anchors = torch.randn(20, 5, generator=generator)
    targets = torch.zeros(4000, 5)
    targets[0] = anchors[3]  # one ordinary token among the zero rows
    problem = problem_of(targets, anchors, base_matrix[:20], base_matrix=base_matrix, seed=11)
    result = get_approximator("focus")(problem)
    drawn = result.rows[1:]
    assert torch.allclose(drawn.mean(dim=0), base_matrix.mean(dim=0), atol=0.15)
    assert torch.allclose(drawn.std(dim=0), base_matrix.std(dim=0), rtol=0.05)
    assert (result.coeffs[1:] == 0).all()
    assert result.coeffs[0].sum().item() == pytest.approx(1.0)
    assert torch.allclose(
        result.rows[:1], problem.combine_base_anchors(result.indices[:1], result.coeffs[:1])
    )
    again = get_approximator("focus")(problem)
    other_seed = get_approximator("focus")(dataclasses.replace(problem, seed=12))
    assert torch.equal(again.rows, result.rows)
    assert not torch.equal(other_seed.rows[1:], result.rows[1:])


def test_focus_does_not_depend_on_batch_size():
    problem = random_problem()
    whole = get_approximator("focus")(dataclasses.replace(problem, batch_size=None))
    batched = get_approximator("focus")(dataclasses.replace(problem, batch_size=5))
    assert torch.allclose(whole.rows, batched.rows, atol=1e-6)


# ---------------------------------------------------------------- WECHSEL


def test_wechsel_uses_the_k_nearest_anchors_with_softmax_weights():
    donor_anchors = unit_circle([0, 10, 20, 90, 180, -15])
    base_anchors = torch.tensor(
        [[1.0], [10.0], [100.0], [1000.0], [1e4], [1e5]], dtype=torch.float64
    )
    targets = unit_circle([5]) * 3
    result = get_approximator("wechsel")(
        problem_of(targets, donor_anchors, base_anchors), k=3, temperature=0.1
    )
    cosines = [math.cos(math.radians(d)) for d in (5, 5, 15)]  # anchors at 0, 10 and 20 degrees
    exps = [math.exp(c / 0.1) for c in cosines]
    expected = (exps[0] * 1.0 + exps[1] * 10.0 + exps[2] * 100.0) / sum(exps)
    assert sorted(result.indices[0].tolist()) == [0, 1, 2]
    assert result.rows[0, 0].item() == pytest.approx(expected, rel=1e-9)
    assert result.coeffs.sum().item() == pytest.approx(1.0)


def test_wechsel_temperature_sharpens_or_flattens_the_weights():
    donor_anchors = unit_circle([0, 30, 60])
    base_anchors = torch.eye(3, dtype=torch.float64)
    problem = problem_of(unit_circle([10]), donor_anchors, base_anchors)
    cold = get_approximator("wechsel")(problem, k=3, temperature=1e-3)
    hot = get_approximator("wechsel")(problem, k=3, temperature=1e3)
    assert torch.allclose(cold.rows, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(hot.rows, torch.full((1, 3), 1 / 3, dtype=torch.float64), atol=1e-3)


def test_wechsel_defaults_are_the_papers_and_k_is_capped_by_the_anchors():
    wechsel = get_approximator("wechsel")
    assert wechsel.validate_parameters({}) == {"k": 10, "temperature": 0.1}
    result = wechsel(random_problem(anchors=4), k=10)
    assert result.indices.shape == (37, 4)
    for bad in ({"temperature": 0}, {"temperature": float("nan")}, {"k": 0}):
        with pytest.raises(TransplantError, match=next(iter(bad))):
            wechsel.validate_parameters(bad)


def test_wechsel_coefficients_reproduce_its_rows():
    problem = dataclasses.replace(random_problem(), batch_size=8)
    result = get_approximator("wechsel")(problem)
    assert torch.allclose(result.rows, problem.combine_base_anchors(result.indices, result.coeffs))


# ---------------------------------------------------------------- CLP


def test_clp_weights_are_normalised_cosine_similarities_over_all_anchors():
    donor_anchors = unit_circle([0, 60, 90])
    base_anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    result = get_approximator("clp")(problem_of(unit_circle([0]), donor_anchors, base_anchors))
    weights = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64) / 1.5
    assert torch.allclose(result.rows[0], weights @ base_anchors)
    assert result.coeffs is None


def test_clp_top_k_keeps_the_k_most_similar_anchors():
    donor_anchors = unit_circle([0, 60, 90, 45])
    base_anchors = torch.tensor([[1.0], [10.0], [100.0], [1000.0]], dtype=torch.float64)
    result = get_approximator("clp")(problem_of(unit_circle([0]), donor_anchors, base_anchors), k=2)
    cos45 = math.cos(math.radians(45))
    assert sorted(result.indices[0].tolist()) == [0, 3]
    assert result.rows[0, 0].item() == pytest.approx((1.0 + cos45 * 1000.0) / (1 + cos45))
    assert result.coeffs.sum().item() == pytest.approx(1.0)


def test_clp_gives_equal_weights_when_similarities_cannot_be_normalised():
    donor_anchors = unit_circle([90, 180])
    base_anchors = torch.tensor([[2.0], [4.0]], dtype=torch.float64)
    result = get_approximator("clp")(problem_of(unit_circle([0]), donor_anchors, base_anchors))
    assert result.rows[0, 0].item() == pytest.approx(3.0)


def test_clp_all_anchors_and_top_k_agree_when_k_covers_every_anchor():
    problem = dataclasses.replace(random_problem(), batch_size=7)
    dense = get_approximator("clp")(problem)
    sparse = get_approximator("clp")(problem, k=50)
    assert torch.allclose(dense.rows, sparse.rows, atol=1e-5)


# ---------------------------------------------------------------- FVT / subword


@pytest.fixture(scope="module")
def byte_level_tok():
    return tiny.byte_level_tokenizer(400)


@pytest.fixture(scope="module")
def metaspace_tok():
    return tiny.metaspace_tokenizer(300)


def donor_vocab_of(datas: list[bytes]) -> Vocabulary:
    forms = {i: TokenForm(TokenKind.TEXT, data) for i, data in enumerate(datas)}
    return Vocabulary(
        forms=forms,
        strings={i: repr(d) for i, d in enumerate(datas)},
        special_ids={},
        encoding=Encoding.PLAIN,
    )


def fvt_problem(tokenizer, datas: list[bytes], is_lm_head: bool = False, base_vocab=None):
    base_vocab = vocabulary_of(tokenizer) if base_vocab is None else base_vocab
    base_matrix = torch.randn(len(tokenizer), 6, generator=torch.Generator().manual_seed(5))
    return ApproximationProblem(
        targets=torch.zeros(len(datas), 3),
        donor_anchors=torch.zeros(1, 3),
        base_anchors=base_matrix[:1],
        base_matrix=base_matrix,
        target_ids=list(range(len(datas))),
        donor_anchor_ids=[0],
        base_anchor_ids=[0],
        donor_vocab=donor_vocab_of(datas),
        base_vocab=base_vocab,
        base_tokenizer=tokenizer,
        is_lm_head=is_lm_head,
        batch_size=3,
    )


WORDS = [
    b"ing",
    b" the",
    b"quick",
    b" lazy dog",
    b"\n",
    b"  ",
    b"Caf\xc3\xa9",
    b" \xf0\x9f\x99\x82",
]


@pytest.mark.parametrize("tokenizer_name", ["byte_level_tok", "metaspace_tok"])
def test_fvt_pieces_spell_exactly_the_new_tokens_bytes(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    problem = fvt_problem(tokenizer, WORDS)
    forms = problem.base_vocab.forms
    for data, ids in zip(WORDS, BasePieces(problem).batch(problem.target_ids), strict=True):
        assert b"".join(forms[i].data for i in ids) == data, (data, ids)


def test_fvt_never_gives_a_word_start_piece_to_a_token_without_a_leading_space(metaspace_tok):
    """A sentencepiece-style tokenizer prepends "▁" to "ing"; FVT must not."""
    assert (
        metaspace_tok.convert_ids_to_tokens(
            metaspace_tok("ing", add_special_tokens=False)["input_ids"]
        )[0]
        == "\u2581"
    )
    problem = fvt_problem(metaspace_tok, [b"ing", b" the"])
    no_space, with_space = BasePieces(problem).batch([0, 1])
    strings = problem.base_vocab.strings
    assert not strings[no_space[0]].startswith("\u2581")
    assert [strings[i] for i in with_space] == ["\u2581the"]


def test_fvt_uses_the_base_tokenizers_own_split_when_it_spells_the_token(byte_level_tok):
    words = [b" the", b"quick", b" lazy", b"Tokenizers", b"."]
    problem = fvt_problem(byte_level_tok, words)
    for data, ids in zip(words, BasePieces(problem).batch(problem.target_ids), strict=True):
        assert ids == byte_level_tok(data.decode(), add_special_tokens=False)["input_ids"]


def test_fvt_row_is_the_mean_of_exactly_the_base_pieces_rows(byte_level_tok):
    problem = fvt_problem(byte_level_tok, WORDS)
    pieces = BasePieces(problem).batch(problem.target_ids)
    result = get_approximator("fvt")(problem)
    for row, ids in zip(result.rows, pieces, strict=True):
        assert torch.allclose(row, problem.base_matrix[ids].mean(dim=0), atol=1e-6)
    assert result.indices is None


def test_fvt_splits_partial_utf8_into_byte_tokens(metaspace_tok, byte_level_tok):
    partial = b"\xe6\x97"  # the first two bytes of 日
    assert utf8_segments(b"a\xe6\x97 b") == ["a", b"\xe6\x97", " b"]
    sentencepiece = fvt_problem(metaspace_tok, [partial])
    (ids,) = BasePieces(sentencepiece).batch([0])
    assert [sentencepiece.base_vocab.strings[i] for i in ids] == ["<0xE6>", "<0x97>"]
    byte_level = fvt_problem(byte_level_tok, [partial])
    (ids,) = BasePieces(byte_level).batch([0])
    assert b"".join(byte_level.base_vocab.forms[i].data for i in ids) == partial


def test_fvt_never_uses_a_base_token_outside_the_problems_base_vocabulary(byte_level_tok):
    """How leave-out validation hides a held-out token from FVT."""
    full = vocabulary_of(byte_level_tok)
    (the,) = byte_level_tok(" the", add_special_tokens=False)["input_ids"]
    hidden = dataclasses.replace(full, forms={i: f for i, f in full.forms.items() if i != the})
    problem = fvt_problem(byte_level_tok, [b" the"], base_vocab=hidden)
    (ids,) = BasePieces(problem).batch([0])
    assert the not in ids
    assert b"".join(full.forms[i].data for i in ids) == b" the"


def test_fvt_gives_the_mean_base_row_to_a_token_with_no_pieces(byte_level_tok):
    empty = Vocabulary(forms={}, strings={}, special_ids={}, encoding=Encoding.BYTE_LEVEL)
    problem = fvt_problem(byte_level_tok, [b"xyz"], base_vocab=empty)
    result = get_approximator("fvt")(problem)
    assert torch.allclose(result.rows[0], problem.base_matrix.mean(dim=0))


@pytest.mark.parametrize("is_lm_head", [False, True])
def test_subword_pooling_methods(byte_level_tok, is_lm_head):
    words = [b" lazy dog", b"Tokenizers"]
    problem = fvt_problem(byte_level_tok, words, is_lm_head=is_lm_head)
    subword = get_approximator("subword")
    assert subword is get_approximator("fvt")
    base = problem.base_matrix
    for row_index, ids in enumerate(BasePieces(problem).batch([0, 1])):
        assert len(ids) >= 2
        pieces = base[ids]
        ramp = torch.arange(1, len(ids) + 1, dtype=torch.float32)
        ramp = ramp.flip(0) if is_lm_head else ramp
        expected = {
            "mean": pieces.mean(dim=0),
            "sum": pieces.sum(dim=0),
            "first_last": pieces[0] if is_lm_head else pieces[-1],
            "weighted_mean": (ramp / ramp.sum()) @ pieces,
        }
        for method, row in expected.items():
            got = subword(problem, subword_method=method).rows[row_index]
            assert torch.allclose(got, row, atol=1e-6), method
    with pytest.raises(TransplantError, match="subword_method"):
        subword.validate_parameters({"subword_method": "median"})


@pytest.mark.parametrize("method", ["mean", "sum", "first_last"])
def test_fvt_matches_mergekits_subword_approximate(byte_level_tok, method):
    """Where the base tokenizer's split spells the token, FVT is mergekit's ``subword``."""
    from mergekit.tokenizer.normalization import TokenMarker
    from mergekit.tokensurgeon.subword import SubwordMethod, subword_approximate

    words = [" the", "quickly", " lazy dog", "Tokenizers split", " 12 345"]
    problem = fvt_problem(byte_level_tok, [w.encode() for w in words])
    ours = get_approximator("fvt")(problem, subword_method=method).rows
    normalized = [(TokenMarker.WORD_START, w[1:]) if w.startswith(" ") else w for w in words]
    theirs = subword_approximate(
        problem.base_matrix,
        normalized,
        is_lm_head=False,
        tok_0=byte_level_tok,
        subword_method=SubwordMethod(method),
    )
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_combine_base_anchors_in_chunks_equals_one_product():
    problem = random_problem(targets=600, anchors=50, seed=9)
    generator = torch.Generator().manual_seed(10)
    indices = torch.randint(0, 50, (600, 7), generator=generator)
    coeffs = torch.randn(600, 7, generator=generator)
    expected = torch.einsum("bk,bkd->bd", coeffs, problem.base_anchors[indices])
    rows = problem.combine_base_anchors(indices, coeffs)  # 600 tokens: three chunks of <= 256
    assert rows.shape == (600, 6)
    assert torch.allclose(rows, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("omp", {"k": 4}),
        ("wechsel", {}),
        ("focus", {}),
        ("clp", {}),
        ("clp", {"k": 5}),
        ("ridge", {}),
        ("omp_ridge", {"k": 4}),
        ("landmark_pca", {}),
        ("common_interpolation", {"k": 4}),
        ("mean", {}),
    ],
)
def test_methods_read_bfloat16_base_anchors_as_their_float32_values(method, parameters):
    """Base anchors keep the base matrix's dtype; every method converts what it reads, so a
    bfloat16 base gives the rows its exactly widened float32 copy gives."""
    generator = torch.Generator().manual_seed(3)
    base_matrix = torch.randn(50, 6, generator=generator).bfloat16()
    anchor_ids = list(range(0, 50, 2))
    fields = dict(base_matrix=base_matrix, seed=5)
    targets = torch.randn(9, 8, generator=generator)
    donor_anchors = torch.randn(len(anchor_ids), 8, generator=generator)
    stored = problem_of(targets, donor_anchors, base_matrix[anchor_ids], **fields)
    widened = problem_of(targets, donor_anchors, base_matrix[anchor_ids].float(), **fields)
    assert stored.base_anchors.dtype == torch.bfloat16
    assert stored.work_dtype == widened.work_dtype == torch.float32
    approximator = get_approximator(method)
    rows = approximator(stored, **parameters).rows
    assert rows.dtype == torch.float32
    assert torch.equal(rows, approximator(widened, **parameters).rows)
