"""Tokens as a person can read them: text where the bytes are UTF-8, escapes where not.

A token is often a piece of a character (one byte of a three-byte UTF-8 sequence) or
whitespace; decoding it with ``errors="replace"`` shows ``'\ufffd'`` for every such token
and hides which bytes it holds. ``readable_bytes`` keeps printable text as it is and writes
everything else as a Python-style escape (``\\n``, ``\\t``, ``\\xe2``, ``\\u200b``), with
backslashes doubled, so the shown form is unambiguous.
"""

from __future__ import annotations

NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
SURROGATE_ESCAPE_BASE = 0xDC00


def _char(char: str) -> str:
    if char in NAMED_ESCAPES:
        return NAMED_ESCAPES[char]
    code = ord(char)
    if SURROGATE_ESCAPE_BASE + 0x80 <= code <= SURROGATE_ESCAPE_BASE + 0xFF:
        return f"\\x{code - SURROGATE_ESCAPE_BASE:02x}"  # a byte that is not UTF-8
    if char == " " or char.isprintable():
        return char
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def readable_bytes(data: bytes) -> str:
    """``data`` as text, with non-UTF-8 bytes and unprintable characters escaped."""
    return "".join(_char(c) for c in data.decode("utf-8", errors="surrogateescape"))


def readable_text(text: str) -> str:
    """A token string with unprintable characters escaped (as ``readable_bytes``)."""
    return readable_bytes(text.encode("utf-8", errors="surrogatepass"))


def quoted(text: str) -> str:
    """An escaped token in single quotes (a quote inside is escaped too)."""
    return "'" + text.replace("'", "\\'") + "'"
