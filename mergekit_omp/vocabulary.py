"""What each token of a tokenizer stands for, as bytes.

Tokens are matched across tokenizers by the bytes they produce, not by their strings:
byte-level BPE writes a newline as ``Ċ`` and a space as ``Ġ``, sentencepiece writes a space
as ``▁`` and raw bytes as ``<0x0A>``, and the same string can mean different bytes in two
vocabularies (``Ċ`` is a newline in GPT-2's alphabet and a letter in sentencepiece's).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

METASPACE = "\u2581"
BYTE_TOKEN_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


class TokenKind(str, enum.Enum):
    TEXT = "text"
    """An ordinary vocabulary entry; its bytes are the text it decodes to."""
    BYTE = "byte"
    """A byte-fallback token such as ``<0x0A>``: exactly one raw byte."""
    ADDED = "added"
    """A special token (``<|endoftext|>``, ``<s>``): matched by its content, not its bytes.

    Non-special added tokens (Gemma's ``"\\n"``) are ordinary text and get ``TEXT``."""


class TokenForm(NamedTuple):
    """A NamedTuple rather than a frozen dataclass: a vocabulary makes one per token, and
    262k frozen-dataclass constructions take 0.9 s."""

    kind: TokenKind
    data: bytes

    def is_numeric(self) -> bool:
        text = self.data.decode("utf-8", errors="ignore").strip()
        return self.kind != TokenKind.ADDED and text != "" and text.isdigit()


class Encoding(str, enum.Enum):
    BYTE_LEVEL = "byte_level"
    METASPACE = "metaspace"
    PLAIN = "plain"


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's entries as token forms, keyed by token id."""

    forms: dict[int, TokenForm]
    strings: dict[int, str]
    special_ids: dict[str, int]
    encoding: Encoding

    def __len__(self) -> int:
        return len(self.forms)

    @property
    def max_id(self) -> int:
        return max(self.forms)

    def spelling(self, text: str) -> str:
        """``text`` as this vocabulary writes it (``Ġ``/``Ċ`` or ``▁`` for space)."""
        if self.encoding == Encoding.BYTE_LEVEL:
            char_of = byte_level_encoder()
            return "".join(char_of[b] for b in text.encode("utf-8"))
        if self.encoding == Encoding.METASPACE:
            return text.replace(" ", METASPACE)
        return text


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable alphabet: character -> the byte it stands for."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return {chr(cp): byte for byte, cp in zip(printable, codepoints, strict=True)}


@lru_cache(maxsize=1)
def byte_level_encoder() -> dict[int, str]:
    """GPT-2's printable alphabet: byte -> the character that stands for it."""
    return {byte: char for char, byte in byte_level_decoder().items()}


@lru_cache(maxsize=1)
def byte_level_translation() -> dict[int, int]:
    """``str.translate`` table that turns the alphabet's characters into the bytes they
    stand for (as code points below 256) and every other character below 256 into one
    that latin-1 cannot encode, so that a token outside the alphabet fails to encode."""
    table = {ord(ch): byte for ch, byte in byte_level_decoder().items()}
    outside = 0x200  # past the alphabet's own code points (256 to 323)
    for code in range(256):
        table.setdefault(code, outside)
    return table


def _component_spec(component: Any) -> dict | None:
    """The JSON form of one ``tokenizers`` component (pre-tokenizer, decoder, normalizer,
    model)."""
    if component is None:
        return None
    return json.loads(component.__getstate__())


def _has_byte_fallback(model: object) -> bool:
    """BPE exposes ``byte_fallback``; Unigram only has it in its JSON form."""
    flag = getattr(model, "byte_fallback", None)
    if flag is None:
        flag = (_component_spec(model) or {}).get("byte_fallback", False)
    return bool(flag)


def _components(node: dict | None) -> list[dict]:
    if not node:
        return []
    children = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers")
    if node.get("type") == "Sequence" and children is not None:
        return [leaf for child in children for leaf in _components(child)]
    return [node]


def detect_encoding(tokenizer: PreTrainedTokenizerBase) -> tuple[Encoding, bool]:
    """How the tokenizer writes bytes in its vocabulary, and whether it has byte fallback."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Each component serialised on its own: the whole tokenizer's JSON (vocabulary and
        # merges) takes seconds to write and parse for a 262k-token vocabulary.
        parts = [
            leaf
            for name in ("pre_tokenizer", "decoder", "normalizer")
            for leaf in _components(_component_spec(getattr(backend, name, None)))
        ]
        types = {part.get("type") for part in parts}
        byte_fallback = _has_byte_fallback(backend.model)
        if "ByteLevel" in types:
            return Encoding.BYTE_LEVEL, byte_fallback
        metaspace_replace = any(
            part.get("type") == "Replace" and METASPACE in json.dumps(part, ensure_ascii=False)
            for part in parts
        )
        if "Metaspace" in types or metaspace_replace:
            return Encoding.METASPACE, byte_fallback
        return Encoding.PLAIN, byte_fallback
    return _guess_encoding_from_strings(list(tokenizer.get_vocab()))


def _guess_encoding_from_strings(tokens: list[str]) -> tuple[Encoding, bool]:
    byte_tokens = sum(1 for t in tokens if BYTE_TOKEN_RE.match(t))
    metaspace = sum(1 for t in tokens if t.startswith(METASPACE))
    byte_level = sum(1 for t in tokens if t.startswith("Ġ"))
    if byte_level > metaspace:
        return Encoding.BYTE_LEVEL, False
    if metaspace > 0:
        return Encoding.METASPACE, byte_tokens >= 256
    return Encoding.PLAIN, byte_tokens >= 256


def token_form(token: str, encoding: Encoding, byte_fallback: bool) -> TokenForm:
    """The bytes one ordinary vocabulary entry stands for."""
    if byte_fallback and token.startswith("<0x") and (m := BYTE_TOKEN_RE.match(token)):
        return TokenForm(TokenKind.BYTE, bytes([int(m.group(1), 16)]))
    if encoding == Encoding.BYTE_LEVEL:
        try:
            return TokenForm(
                TokenKind.TEXT, token.translate(byte_level_translation()).encode("latin-1")
            )
        except UnicodeEncodeError:  # a character outside the alphabet: the text as is
            return TokenForm(TokenKind.TEXT, token.encode("utf-8"))
    if encoding == Encoding.METASPACE:
        return TokenForm(TokenKind.TEXT, token.replace(METASPACE, " ").encode("utf-8"))
    return TokenForm(TokenKind.TEXT, token.encode("utf-8"))


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    ids = {}
    for role in SPECIAL_ROLES:
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(token_id, int):
            ids[role] = token_id
    return ids


def vocabulary_of(tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
    """Decode every entry of ``tokenizer`` to the bytes it stands for."""
    encoding, byte_fallback = detect_encoding(tokenizer)
    added = tokenizer.added_tokens_decoder
    strings = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    forms = {}
    for token_id, token in strings.items():
        if token_id not in added or (byte_fallback and BYTE_TOKEN_RE.match(token)):
            forms[token_id] = token_form(token, encoding, byte_fallback)
        elif added[token_id].special:
            forms[token_id] = TokenForm(TokenKind.ADDED, added[token_id].content.encode("utf-8"))
        else:
            # a non-special added token (Gemma's "\n", "\n\n") matches its content literally
            forms[token_id] = TokenForm(TokenKind.TEXT, added[token_id].content.encode("utf-8"))
    return Vocabulary(
        forms=forms,
        strings=strings,
        special_ids=special_token_ids(tokenizer),
        encoding=encoding,
    )
