"""Pair donor tokens with base tokens: exact, byte, special-by-role and prefix matches.

Every donor token either gets a base row to copy (a match) or is left for an approximator
(a new token). Anchors, the tokens both vocabularies share, are the exact and byte matches.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from mergekit_omp.vocabulary import TokenForm, TokenKind, Vocabulary


class MatchKind(str, enum.Enum):
    EXACT = "exact"
    BYTE = "byte"
    SPECIAL = "special"
    PREFIX = "prefix"


ANCHOR_KINDS = (MatchKind.EXACT, MatchKind.BYTE)
ROLE_PRIORITY = ("eos", "bos", "pad", "unk")
"""A donor token with several roles takes the base row of the first: ending generation
(eos) matters most; a BOS the output must insert is paired separately (``forced_pairs``)."""


@dataclass(frozen=True)
class MatchPolicy:
    byte_match: bool = False
    prefix_match: bool = False


@dataclass(frozen=True)
class VocabularyMatch:
    """How each donor token id gets its row: copied from a base row, approximated, or zero."""

    matched: dict[int, tuple[int, MatchKind]]
    new_tokens: list[int]
    junk_tokens: list[int] = field(default_factory=list)
    donor_rows: int | None = None
    """The donor matrix's rows: a token past them (a tokenizer longer than the matrix) can be
    matched, but it has no donor row to anchor on."""

    def anchors(self) -> tuple[list[int], list[int]]:
        """Donor and base ids of the shared tokens that have a donor row, in donor id order."""
        pairs = sorted(
            (donor_id, base_id)
            for donor_id, (base_id, kind) in self.matched.items()
            if kind in ANCHOR_KINDS and (self.donor_rows is None or donor_id < self.donor_rows)
        )
        return [d for d, _ in pairs], [b for _, b in pairs]

    def counts(self) -> dict[str, int]:
        counts = {kind.value: 0 for kind in MatchKind}
        for _, kind in self.matched.values():
            counts[kind.value] += 1
        counts["approximated"] = len(self.new_tokens)
        counts["junk"] = len(self.junk_tokens)
        return counts


def _first_id_by_form(vocab: Vocabulary, usable: Collection[int]) -> dict[TokenForm, int]:
    index: dict[TokenForm, int] = {}
    for token_id in sorted(vocab.forms):
        if token_id in usable:
            index.setdefault(vocab.forms[token_id], token_id)
    return index


def first_id_by_bytes(vocab: Vocabulary, usable: Collection[int]) -> dict[bytes, int]:
    """Bytes -> lowest usable id over ordinary and byte-fallback tokens, ordinary first."""
    by_kind: dict[TokenKind, dict[bytes, int]] = {TokenKind.TEXT: {}, TokenKind.BYTE: {}}
    for token_id in sorted(vocab.forms):
        kind, data = vocab.forms[token_id]
        if kind in by_kind and token_id in usable:
            by_kind[kind].setdefault(data, token_id)
    return by_kind[TokenKind.BYTE] | by_kind[TokenKind.TEXT]


def _longest_prefix(data: bytes, by_bytes: dict[bytes, int]) -> int | None:
    for end in range(len(data) - 1, 0, -1):
        if (base_id := by_bytes.get(data[:end])) is not None:
            return base_id
    return None


def match_vocabularies(
    donor: Vocabulary,
    base: Vocabulary,
    policy: MatchPolicy,
    donor_rows: int,
    base_rows: int,
    well_trained: tuple[AbstractSet[int], AbstractSet[int]] | None = None,
    forced_pairs: dict[int, int] | None = None,
) -> VocabularyMatch:
    """Pair every donor token with a base token (id below ``base_rows``), or not.

    Unmatched donor tokens with a donor row (id below ``donor_rows``) are left to an
    approximator; those without one are zeroed (``junk_tokens``).

    ``well_trained`` (donor ids, base ids), from ``--magikarp``, restricts matches to pairs
    that are well trained on both sides, and zeroes donor tokens trained on neither.
    ``forced_pairs`` (donor id -> base id) are special matches that take precedence.
    """
    usable_base = {i for i in base.forms if i < base_rows}
    if well_trained is not None:
        usable_base &= well_trained[1]
    by_form = _first_id_by_form(base, usable_base)
    by_bytes = first_id_by_bytes(base, usable_base)
    role_of_donor: dict[int, str] = {}
    for role in ROLE_PRIORITY:  # a token with several roles keeps the first
        if role in donor.special_ids:
            role_of_donor.setdefault(donor.special_ids[role], role)

    matched: dict[int, tuple[int, MatchKind]] = {}
    new_tokens: list[int] = []
    junk: list[int] = []
    for donor_id in sorted(donor.forms):
        form = donor.forms[donor_id]
        if forced_pairs and forced_pairs.get(donor_id, base_rows) < base_rows:
            matched[donor_id] = (forced_pairs[donor_id], MatchKind.SPECIAL)
            continue
        base_id = by_form.get(form)
        if well_trained is not None and donor_id not in well_trained[0]:
            # magikarp: a token trained in neither model is zeroed, as mergekit does
            if base_id is None:
                junk.append(donor_id)
                continue
            base_id = None
        if base_id is not None:
            matched[donor_id] = (base_id, MatchKind.EXACT)
        elif (donor_role := role_of_donor.get(donor_id)) and (
            (base_id := base.special_ids.get(donor_role)) is not None and base_id in usable_base
        ):
            matched[donor_id] = (base_id, MatchKind.SPECIAL)
        elif (
            policy.byte_match
            and form.kind != TokenKind.ADDED
            and (base_id := by_bytes.get(form.data)) is not None
        ):
            matched[donor_id] = (base_id, MatchKind.BYTE)
        elif (
            policy.prefix_match
            and form.kind == TokenKind.TEXT
            and (base_id := _longest_prefix(form.data, by_bytes)) is not None
        ):
            matched[donor_id] = (base_id, MatchKind.PREFIX)
        elif donor_id >= donor_rows:
            junk.append(donor_id)  # no donor row to approximate from
        else:
            new_tokens.append(donor_id)
    return VocabularyMatch(
        matched=matched, new_tokens=new_tokens, junk_tokens=junk, donor_rows=donor_rows
    )
