"""The one error type a user sees as a single line from the command line tools, and the
shortening of other libraries' multi-line messages to one line."""

from __future__ import annotations

import re


class TransplantError(Exception):
    """Bad input or an impossible request, explained in one sentence."""


class UsageValueError(TransplantError):
    """A command-line value out of range, found only once the inputs are read (a
    ``--holdout`` count beyond the shared tokens): exit 2, as click's usage errors."""


def _unpickling(match: re.Match[str]) -> str:
    operand = re.search(r"Unsupported operand (\d+)", match.string)
    if operand:  # e.g. 149, FRAME: torch.save(..., pickle_protocol=4) without the zip format
        return (
            f"torch's safe loader cannot read this pickle (unsupported operand "
            f"{operand.group(1)}); nothing in it was run: not loaded (save it as safetensors)"
        )
    found = re.search(r"unsupported GLOBAL (\S+)", match.string)
    what = f" ({found.group(1)})" if found else ""
    return f"the pickle file refers to code{what}, which is never run: not loaded"


# Known multi-line messages of transformers, huggingface_hub and torch, from the phrase that
# starts them, each with its one-line meaning.
KNOWN_MESSAGES: tuple[tuple[re.Pattern[str], object], ...] = (
    (re.compile(r"Weights only load failed.*", re.S), _unpickling),
    (
        re.compile(r"The repository .* contains custom code.*", re.S),
        "it needs its own Python code to load (run with --trust-remote-code if you trust it)",
    ),
    (
        re.compile(r"We couldn't connect to .*", re.S),
        "not a local directory and not in the Hugging Face cache (the hub cannot be reached)",
    ),
    (
        re.compile(r"Couldn't instantiate the backend tokenizer.*", re.S),
        "no tokenizer file it can read (tokenizer.json, or tokenizer.model with "
        "sentencepiece installed)",
    ),
)


def one_line(text: str) -> str:
    """``text`` as one line: known multi-line library messages replaced by their meaning,
    anything else cut to its first non-empty line."""
    for pattern, meaning in KNOWN_MESSAGES:
        found = pattern.search(text)
        if found:
            short = meaning(found) if callable(meaning) else meaning
            text = text[: found.start()] + str(short)
            break
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""
