"""How each tokenizer splits numbers, and whether base and donor agree.

The OMP paper (arXiv 2506.06607) finds that arithmetic collapses when the two tokenizers
split numbers differently (GSM8K fell 73.8% with mismatched schemes, 5.6% with aligned
ones): a donor token "123" has no counterpart in a base that only knows single digits, so
its row is approximated from unrelated anchors. We probe each tokenizer with numbers of 1
to 12 digits, bare and after a space, and name the scheme its splits follow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from mergekit_omp.match import VocabularyMatch
from mergekit_omp.readable import quoted, readable_bytes
from mergekit_omp.vocabulary import TokenKind, Vocabulary, vocabulary_of

DIGIT_SOURCES = ("31415926535897932384", "27182818284590452353", "10000000000000000000")
PROBE_LENGTHS = range(1, 13)
EXAMPLE_PROBES = ("1234567", " 2024", "3141592653")
COMPLETENESS_DIGITS = 3
GSM8K_NOTE = "expect weaker arithmetic (GSM8K fell 73.8% with mismatched schemes in the OMP paper)"

Segmentation = tuple[str, ...]
"""The digit groups of one probe number, in order: ("123", "456", "7")."""


def probe_numbers() -> list[str]:
    """Numbers of every length in ``PROBE_LENGTHS``, bare and after a space."""
    bare = [source[:length] for source in DIGIT_SOURCES for length in PROBE_LENGTHS]
    bare += [p.strip() for p in EXAMPLE_PROBES]
    unique = list(dict.fromkeys(bare))
    return unique + [" " + number for number in unique]


def token_digits(vocabulary: Vocabulary, token_id: int, tokenizer: PreTrainedTokenizerBase) -> str:
    """The ASCII digits token ``token_id`` stands for ("Ġ12" -> "12", "<0x30>" -> "0")."""
    form = vocabulary.forms.get(token_id)
    if form is not None and form.kind != TokenKind.ADDED:
        text = form.data.decode("latin-1")
    else:
        text = cast(str, tokenizer.decode([token_id]))
    return "".join(ch for ch in text if "0" <= ch <= "9")


def segment(
    tokenizer: PreTrainedTokenizerBase, vocabulary: Vocabulary, number: str
) -> Segmentation | None:
    """The digit groups the tokenizer makes of ``number``; None if digits were lost (unk)."""
    ids = tokenizer(number, add_special_tokens=False)["input_ids"]
    groups = tuple(
        digits for token_id in ids if (digits := token_digits(vocabulary, token_id, tokenizer))
    )
    return groups if "".join(groups) == number.strip() else None


def chunked(length: int, size: int, *, from_right: bool) -> tuple[int, ...]:
    """Group sizes of a ``length``-digit number cut into groups of ``size``."""
    full, rest = divmod(length, size)
    partial = (rest,) if rest else ()
    return partial + (size,) * full if from_right else (size,) * full + partial


def classify(segmentations: Iterable[Segmentation]) -> tuple[str, int]:
    """The scheme every segmentation follows, and the most digits in one token.

    ``single_digit``, ``whole_numbers`` (each number one token), ``groups_of_N_ltr`` (cut
    into groups of N from the left: 1234567 -> 123|456|7, Llama-3), ``groups_of_N_rtl``
    (from the right: 1|234|567), or ``mixed`` (learned merges with no fixed rule, GPT-2).
    """
    sizes = [tuple(len(group) for group in seg) for seg in segmentations]
    if not sizes:
        return "unknown", 0
    longest = max(max(s) for s in sizes)
    if longest == 1:
        return "single_digit", 1
    if all(len(s) == 1 for s in sizes):
        return "whole_numbers", longest
    for from_right, name in ((False, "ltr"), (True, "rtl")):
        if all(s == chunked(sum(s), longest, from_right=from_right) for s in sizes):
            return f"groups_of_{longest}_{name}", longest
    return "mixed", longest


class NumberScheme(BaseModel):
    """How one tokenizer splits numbers."""

    model_config = ConfigDict(frozen=True)

    scheme: str = Field(description="single_digit, groups_of_N_ltr/rtl, whole_numbers, mixed")
    max_digits_per_token: int = Field(description="Most digits in one token of the probes")
    longest_numeric_token: int = Field(description="Most digits in one all-digit vocabulary entry")
    numeric_tokens: int = Field(description="Vocabulary entries that are all digits (spaces aside)")
    complete_up_to: int = Field(
        description="Largest n <= 3 such that every n-digit string is a vocabulary entry"
    )
    examples: dict[str, list[str]] = Field(description="How a few probes are split")
    segmentations: dict[str, Segmentation] = Field(exclude=True, repr=False)


def numeric_texts(vocabulary: Vocabulary) -> list[str]:
    """The digits of every all-digit vocabulary entry, spaces stripped (with repeats)."""
    return [
        form.data.decode("utf-8", errors="ignore").strip()
        for form in vocabulary.forms.values()
        if form.is_numeric()
    ]


def complete_up_to(numbers: set[str], max_digits: int = COMPLETENESS_DIGITS) -> int:
    complete = 0
    for digits in range(1, max_digits + 1):
        if all(f"{n:0{digits}d}" in numbers for n in range(10**digits)):
            complete = digits
        else:
            break
    return complete


def number_scheme(
    tokenizer: PreTrainedTokenizerBase, vocabulary: Vocabulary | None = None
) -> NumberScheme:
    """Probe ``tokenizer`` with numbers and name the scheme its splits follow."""
    if vocabulary is None:
        vocabulary = vocabulary_of(tokenizer)
    segmentations = {
        number: seg
        for number in probe_numbers()
        if (seg := segment(tokenizer, vocabulary, number)) is not None
    }
    scheme, max_digits = classify(segmentations.values())
    numbers = numeric_texts(vocabulary)
    return NumberScheme(
        scheme=scheme,
        max_digits_per_token=max_digits,
        longest_numeric_token=max((len(n) for n in numbers), default=0),
        numeric_tokens=len(numbers),
        complete_up_to=complete_up_to(set(numbers)),
        examples={p: list(segmentations[p]) for p in EXAMPLE_PROBES if p in segmentations},
        segmentations=segmentations,
    )


class NumberComparison(BaseModel):
    """Base and donor number schemes side by side, and what the transplant did to numbers."""

    model_config = ConfigDict(frozen=True)

    aligned: bool = Field(description="Same scheme and the same split of every probe")
    agreement: float = Field(description="Share of probes both tokenizers split the same way")
    base: NumberScheme
    donor: NumberScheme
    differences: list[dict[str, list[str] | str]] = Field(
        description="A few probes the two tokenizers split differently"
    )
    numeric_donor_tokens: int = 0
    numeric_matched: int = 0
    numeric_approximated: int = 0
    approximated_examples: list[str] = Field(default_factory=list)

    @property
    def schemes_differ(self) -> bool:
        """The tokenizers follow different rules (single digits against learned merges, say),
        not merely different merges under the same rule."""
        return self.base.scheme != self.donor.scheme

    def warning(self) -> str | None:
        """A warning when the base will see numbers split by another rule, or when numeric
        donor tokens get approximated rows; none when the splits differ under the same rule
        and every numeric donor token has a real base row."""
        if self.aligned or (not self.schemes_differ and self.numeric_approximated == 0):
            return None
        approximated = ""
        if self.numeric_approximated:
            shown = ", ".join(quoted(t) for t in self.approximated_examples[:3])
            approximated = (
                f"{self.numeric_approximated} of the donor's {self.numeric_donor_tokens} numeric "
                f"tokens approximated ({shown}{', ...' if self.numeric_approximated > 3 else ''})"
            )
        if not self.schemes_differ:
            digits = any(len(t) == 1 for t in self.approximated_examples)
            hint = "; -bm yes matches single digits written as byte tokens" if digits else ""
            return f"numbers: {approximated}: expect weaker arithmetic{hint}"
        schemes = (
            f"base splits numbers as {self.base.scheme} (at most "
            f"{self.base.max_digits_per_token} digits per token), donor as {self.donor.scheme}"
            f" (at most {self.donor.max_digits_per_token})"
        )
        return f"number tokenization differs: {schemes}; {approximated or 'none approximated'}; {GSM8K_NOTE}"


def compare_schemes(
    base: NumberScheme, donor: NumberScheme, max_differences: int = 3
) -> tuple[bool, float, list[dict[str, list[str] | str]]]:
    shared = [p for p in base.segmentations if p in donor.segmentations]
    differing = [p for p in shared if base.segmentations[p] != donor.segmentations[p]]
    agreement = 1.0 - len(differing) / len(shared) if shared else 0.0
    aligned = base.scheme == donor.scheme and not differing and bool(shared)
    differences: list[dict[str, list[str] | str]] = [
        {
            "number": p,
            "base": list(base.segmentations[p]),
            "donor": list(donor.segmentations[p]),
        }
        for p in differing[:max_differences]
    ]
    return aligned, round(agreement, 4), differences


def numeric_token_fates(
    donor_vocab: Vocabulary, match: VocabularyMatch
) -> tuple[int, int, list[int]]:
    """(numeric donor tokens, of them matched, ids of those approximated)."""
    numeric = {i for i, form in donor_vocab.forms.items() if form.is_numeric()}
    matched = sum(1 for i in match.matched if i in numeric)
    approximated = [i for i in match.new_tokens if i in numeric]
    return len(numeric), matched, approximated


def compare_numbers(
    base_tokenizer: PreTrainedTokenizerBase,
    donor_tokenizer: PreTrainedTokenizerBase,
    base_vocab: Vocabulary,
    donor_vocab: Vocabulary,
    match: VocabularyMatch | None = None,
    max_examples: int = 10,
) -> NumberComparison:
    """Both tokenizers' number schemes and, given the match, the fate of numeric tokens."""
    base = number_scheme(base_tokenizer, base_vocab)
    donor = number_scheme(donor_tokenizer, donor_vocab)
    aligned, agreement, differences = compare_schemes(base, donor)
    fates: dict[str, Any] = {}
    if match is not None:
        total, matched, approximated = numeric_token_fates(donor_vocab, match)
        fates = {
            "numeric_donor_tokens": total,
            "numeric_matched": matched,
            "numeric_approximated": len(approximated),
            "approximated_examples": token_strings(donor_vocab, approximated[:max_examples]),
        }
    return NumberComparison(
        aligned=aligned,
        agreement=agreement,
        base=base,
        donor=donor,
        differences=differences,
        **fates,
    )


def token_strings(vocabulary: Vocabulary, ids: Sequence[int]) -> list[str]:
    return [readable_bytes(vocabulary.forms[i].data) for i in ids]
