from __future__ import annotations

import pytest
import tiny
from tokenizers import AddedToken

from mergekit_omp.match import MatchKind, MatchPolicy, match_vocabularies
from mergekit_omp.vocabulary import Encoding, TokenForm, TokenKind, token_form, vocabulary_of

TRAP_TEXT = ["Ċ is a letter in Latvian-style names: Ċaro Ċ Ċ, and ĉ too.\n"] * 30


@pytest.fixture(scope="module")
def donor():
    return tiny.byte_level_tokenizer(400)


@pytest.fixture(scope="module")
def base():
    return tiny.metaspace_tokenizer(320, texts=tiny.corpus() + TRAP_TEXT)


def donor_id(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def test_encodings_are_detected(donor, base):
    assert vocabulary_of(donor).encoding == Encoding.BYTE_LEVEL
    assert vocabulary_of(base).encoding == Encoding.METASPACE


@pytest.mark.parametrize(
    "token,expected",
    [
        ("Ċ", b"\n"),
        ("ĉ", b"\t"),
        ("Ġ", b" "),
        ("Ġthe", b" the"),
        ("Ã©", "é".encode()),
        ("æľ¬", "本".encode()),
        ("æ", b"\xe6"),  # a lone UTF-8 lead byte
    ],
)
def test_byte_level_tokens_decode_to_their_bytes(donor, token, expected):
    vocab = vocabulary_of(donor)
    assert vocab.forms[donor_id(donor, token)] == TokenForm(TokenKind.TEXT, expected)


@pytest.mark.parametrize(
    "token",
    [
        "Ġa b",  # a literal space: below 256 but not in the alphabet (which writes it Ġ)
        "Ġx\x7f",  # DEL, also outside the alphabet
        "Ġ日本",  # above the alphabet's code points
        "\u00ad",  # the soft hyphen, the one gap in the alphabet's Latin-1 range
    ],
)
def test_byte_level_token_outside_the_alphabet_is_its_text(token):
    assert token_form(token, Encoding.BYTE_LEVEL, False) == TokenForm(
        TokenKind.TEXT, token.encode("utf-8")
    )


def test_metaspace_tokens_decode_to_their_bytes(base):
    vocab = vocabulary_of(base)
    assert vocab.forms[base.convert_tokens_to_ids("<0x0A>")] == TokenForm(TokenKind.BYTE, b"\n")
    assert vocab.forms[base.convert_tokens_to_ids("<0xE6>")] == TokenForm(TokenKind.BYTE, b"\xe6")
    assert vocab.forms[base.convert_tokens_to_ids("\u2581the")].data == b" the"
    assert vocab.forms[base.convert_tokens_to_ids("Ċ")].data == "Ċ".encode()
    assert vocab.forms[base.convert_tokens_to_ids("</s>")] == TokenForm(TokenKind.ADDED, b"</s>")


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_unigram_byte_fallback_is_detected(byte_fallback):
    """Unigram keeps byte_fallback only in its JSON form (BPE also has an attribute)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("\u2581the", -1.0), ("<0x0A>", -2.0)]
    backend = Tokenizer(models.Unigram(pieces, 0, byte_fallback=byte_fallback))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    vocab = vocabulary_of(tok)
    assert vocab.encoding == Encoding.METASPACE
    newline = vocab.forms[tok.convert_tokens_to_ids("<0x0A>")]
    assert newline == (
        TokenForm(TokenKind.BYTE, b"\n") if byte_fallback else TokenForm(TokenKind.TEXT, b"<0x0A>")
    )


NO_EXTRA_MATCHING = MatchPolicy()


def matched_base_token(
    donor, base, token: str, policy: MatchPolicy = NO_EXTRA_MATCHING
) -> tuple[str, MatchKind] | None:
    match = match_vocabularies(vocabulary_of(donor), vocabulary_of(base), policy, 10**6, 10**6)
    pair = match.matched.get(donor_id(donor, token))
    if pair is None:
        return None
    return base.convert_ids_to_tokens(pair[0]), pair[1]


def test_newline_pairs_with_newline_not_with_the_letter_c_dot(donor, base):
    assert (
        "Ċ" in base.get_vocab()
    )  # the trap is there: a sentencepiece letter spelled like GPT-2's newline
    assert matched_base_token(donor, base, "Ċ") == ("\n", MatchKind.EXACT)
    assert matched_base_token(donor, base, "ĉ") == ("\t", MatchKind.EXACT)


def test_space_prefixed_words_match_metaspace_words(donor, base):
    assert matched_base_token(donor, base, "Ġthe") == ("\u2581the", MatchKind.EXACT)
    assert matched_base_token(donor, base, "Ã©") == ("é", MatchKind.EXACT)


def test_partial_utf8_tokens_need_byte_match(donor, base):
    """A byte-level token for a lone UTF-8 lead byte equals a sentencepiece <0xNN> token."""
    lead = "æ"  # byte 0xE6
    assert vocabulary_of(donor).forms[donor_id(donor, lead)].data == b"\xe6"
    assert matched_base_token(donor, base, lead) is None
    assert matched_base_token(donor, base, lead, MatchPolicy(byte_match=True)) == (
        "<0xE6>",
        MatchKind.BYTE,
    )


def test_special_tokens_match_by_role_when_strings_differ(donor, base):
    assert donor.eos_token == "<|endoftext|>" and base.eos_token == "</s>"
    match = match_vocabularies(
        vocabulary_of(donor), vocabulary_of(base), MatchPolicy(), 10**6, 10**6
    )
    assert match.matched[donor.eos_token_id] == (base.eos_token_id, MatchKind.SPECIAL)
    donor_anchor_ids, _ = match.anchors()
    assert donor.eos_token_id not in donor_anchor_ids


def test_prefix_match_uses_the_longest_base_prefix(donor, base):
    vocab_d, vocab_b = vocabulary_of(donor), vocabulary_of(base)
    match = match_vocabularies(vocab_d, vocab_b, MatchPolicy(prefix_match=True), 10**6, 10**6)
    base_by_bytes = {f.data: i for i, f in vocab_b.forms.items() if f.kind == TokenKind.TEXT}
    prefixed = [(d, b) for d, (b, kind) in match.matched.items() if kind == MatchKind.PREFIX]
    assert prefixed
    for d, b in prefixed:
        data = vocab_d.forms[d].data
        assert data not in base_by_bytes
        assert data.startswith(vocab_b.forms[b].data)
        longer = [data[:n] for n in range(len(vocab_b.forms[b].data) + 1, len(data))]
        assert not any(p in base_by_bytes for p in longer)


def test_every_donor_token_is_accounted_for_once(donor, base):
    match = match_vocabularies(
        vocabulary_of(donor),
        vocabulary_of(base),
        MatchPolicy(True, True),
        donor_rows=390,
        base_rows=10**6,
    )
    ids = list(match.matched) + match.new_tokens + match.junk_tokens
    assert sorted(ids) == list(range(len(donor)))
    assert all(i >= 390 for i in match.junk_tokens)
    assert all(i < 390 for i in match.new_tokens)


def test_non_special_added_tokens_match_as_text(donor):
    """Gemma's newline runs are added, non-special tokens: they are text, not specials."""
    base = tiny.metaspace_tokenizer(320)
    base_bytes = {f.data for f in vocabulary_of(base).forms.values()}
    donor_vocab = vocabulary_of(donor)
    token = next(
        donor.convert_ids_to_tokens(i)
        for i, f in sorted(donor_vocab.forms.items())
        if f.kind == TokenKind.TEXT
        and len(f.data) > 3
        and f.data.isalpha()
        and f.data not in base_bytes
    )
    text = donor_vocab.forms[donor.convert_tokens_to_ids(token)].data.decode()
    base.add_tokens([AddedToken(text, normalized=False, special=False)])
    assert not base.added_tokens_decoder[base.convert_tokens_to_ids(text)].special
    assert matched_base_token(donor, base, token) == (text, MatchKind.EXACT)


def test_a_token_with_two_roles_takes_the_eos_row(base):
    """SmolLM2's <|im_end|> is both eos and pad: it must get the base's eos row."""
    donor = tiny.byte_level_tokenizer(400)
    donor.eos_token = "<|im_end|>"
    donor.pad_token = "<|im_end|>"
    match = match_vocabularies(
        vocabulary_of(donor), vocabulary_of(base), MatchPolicy(), 10**6, 10**6
    )
    assert match.matched[donor.eos_token_id] == (base.eos_token_id, MatchKind.SPECIAL)
