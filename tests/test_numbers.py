"""Number-tokenization schemes: detection, comparison, and the transplant's report of them."""

from __future__ import annotations

import pytest
import tiny
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.diagnostics.numbers import (
    GSM8K_NOTE,
    chunked,
    classify,
    compare_numbers,
    number_scheme,
    probe_numbers,
)
from mergekit_omp.vocabulary import vocabulary_of

LTR_GROUPS_OF_3 = r"\d{1,3}"  # Llama-3 / GPT-4: \p{N}{1,3}
RTL_GROUPS_OF_3 = r"\d{1,3}(?=(?:\d{3})*(?!\d))"


def word_level_tokenizer(pattern: str, numbers: list[str]) -> transformers.PreTrainedTokenizerFast:
    """Digits pre-split by ``pattern``; every group in ``numbers`` is one vocabulary entry."""
    vocab = {"[UNK]": 0, " ": 1}
    for number in numbers:
        vocab.setdefault(number, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def all_numbers_up_to(digits: int) -> list[str]:
    return [f"{n:0{d}d}" for d in range(1, digits + 1) for n in range(10**d)]


@pytest.fixture(scope="module")
def single_digit_tok():
    return tiny.byte_level_tokenizer(400, individual_digits=True)


@pytest.mark.parametrize(
    "sizes,expected",
    [
        ([(1,), (1, 1, 1), (1,) * 7], ("single_digit", 1)),
        ([(1,), (3,), (3, 1), (3, 3, 1), (3, 3, 3, 2)], ("groups_of_3_ltr", 3)),
        ([(1,), (3,), (1, 3), (1, 3, 3), (2, 3, 3, 3)], ("groups_of_3_rtl", 3)),
        ([(2,), (2, 2, 1)], ("groups_of_2_ltr", 2)),
        ([(1,), (4,), (7,)], ("whole_numbers", 7)),
        ([(2, 1, 2, 2), (1, 2)], ("mixed", 2)),
        ([], ("unknown", 0)),
    ],
)
def test_classify_names_the_rule_every_split_follows(sizes, expected):
    segmentations = [tuple("9" * size for size in split) for split in sizes]
    assert classify(segmentations) == expected


def test_groups_are_cut_from_the_left_or_from_the_right():
    assert chunked(7, 3, from_right=False) == (3, 3, 1)
    assert chunked(7, 3, from_right=True) == (1, 3, 3)
    assert chunked(6, 3, from_right=True) == (3, 3)


def test_individual_digits_tokenizer_is_single_digit(single_digit_tok):
    scheme = number_scheme(single_digit_tok)
    assert scheme.scheme == "single_digit"
    assert scheme.max_digits_per_token == 1
    assert scheme.examples["1234567"] == list("1234567")
    assert scheme.complete_up_to == 1  # all ten digits are tokens


def test_learned_merges_without_a_digit_rule_are_mixed(byte_level_tok):
    # trained on "12 345 6789 3.14159": BPE merged some digit pairs, with no fixed rule
    scheme = number_scheme(byte_level_tok)
    assert scheme.scheme == "mixed"
    assert scheme.max_digits_per_token == 2
    assert scheme.examples["1234567"] == ["12", "3", "45", "67"]


def test_llama3_style_groups_of_three_from_the_left():
    scheme = number_scheme(word_level_tokenizer(LTR_GROUPS_OF_3, all_numbers_up_to(3)))
    assert (scheme.scheme, scheme.max_digits_per_token) == ("groups_of_3_ltr", 3)
    assert scheme.examples["1234567"] == ["123", "456", "7"]
    assert scheme.complete_up_to == 3
    assert scheme.numeric_tokens == 1110


def test_groups_of_three_from_the_right():
    scheme = number_scheme(word_level_tokenizer(RTL_GROUPS_OF_3, all_numbers_up_to(3)))
    assert scheme.scheme == "groups_of_3_rtl"
    assert scheme.examples["1234567"] == ["1", "234", "567"]


def test_whole_numbers_in_the_vocabulary():
    numbers = sorted({p.strip() for p in probe_numbers()})
    scheme = number_scheme(word_level_tokenizer(r"\d+", numbers))
    assert (scheme.scheme, scheme.max_digits_per_token) == ("whole_numbers", 12)
    assert scheme.longest_numeric_token == 12


def test_different_digit_handling_is_reported_as_mismatched(single_digit_tok, byte_level_tok):
    comparison = compare_numbers(
        single_digit_tok,
        byte_level_tok,
        vocabulary_of(single_digit_tok),
        vocabulary_of(byte_level_tok),
    )
    assert not comparison.aligned
    assert comparison.base.scheme == "single_digit" and comparison.donor.scheme == "mixed"
    assert 0 < comparison.agreement < 1
    first = comparison.differences[0]
    assert first["base"] != first["donor"]
    assert "".join(first["base"]) == "".join(first["donor"]) == first["number"].strip()
    warning = comparison.warning()
    assert "single_digit" in warning and "mixed" in warning and GSM8K_NOTE in warning


def test_identical_tokenizers_are_aligned(single_digit_tok):
    other = tiny.byte_level_tokenizer(300, individual_digits=True)
    comparison = compare_numbers(
        single_digit_tok, other, vocabulary_of(single_digit_tok), vocabulary_of(other)
    )
    assert comparison.aligned
    assert comparison.agreement == 1.0
    assert comparison.differences == []
    assert comparison.warning() is None


def test_transplant_reports_schemes_and_counts_numeric_tokens_approximated(
    tmp_path, single_digit_tok, byte_level_tok
):
    base = tiny.tiny_llama(single_digit_tok, tmp_path / "base", hidden_size=16, seed=1)
    donor = tiny.tiny_llama(byte_level_tok, tmp_path / "donor", hidden_size=16, seed=2)
    result = transplant(
        TransplantOptions(base_model=str(base), donor=str(donor), method="mean"), progress=False
    )
    donor_vocab, base_vocab = vocabulary_of(byte_level_tok), vocabulary_of(single_digit_tok)
    base_forms = set(base_vocab.forms.values())
    numeric = [i for i, form in donor_vocab.forms.items() if form.is_numeric()]
    missing = [i for i in numeric if donor_vocab.forms[i] not in base_forms]
    assert len(missing) > 0

    numbers = result.report.diagnostics.numbers
    assert numbers is not None
    assert numbers.aligned is False
    assert numbers.base.scheme == "single_digit"
    assert numbers.donor.scheme == "mixed"
    assert numbers.numeric_donor_tokens == len(numeric)
    assert numbers.numeric_approximated == len(missing)
    assert numbers.numeric_matched == len(numeric) - len(missing)
    assert any(w.startswith("number tokenization differs") for w in result.report.warnings)
    assert "numbers: MISMATCHED: base single_digit" in result.report.summary(verbose=True)
