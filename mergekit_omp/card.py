"""Model card: the README.md written into every output directory, in the style of mergekit's
merge cards, so the directory can be pushed to a model hub as it is.

Built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData``: ``base_model`` is the base
(when it is a hub id), the donor is named in the text as the tokenizer's source. Everything
that comes from the inputs (the output's name, model paths, token strings in warnings) is
escaped for Markdown and HTML, so a token such as ``<script>`` or ``[x](javascript:...)``
shows as text and never as markup.
"""

from __future__ import annotations

import html
import os
import re
import unicodedata

from huggingface_hub import ModelCard, ModelCardData

from mergekit_omp.approximators import get_approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import HUB_ID_RE
from mergekit_omp.options import TransplantOptions
from mergekit_omp.recipe import recipe_yaml
from mergekit_omp.report import MatrixReport, TransplantReport

RECIPE_FILE = "mergekit_omp_recipe.yml"
"""The recipe of the transplant, written into every output directory."""
MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]|])")
"""What could make markup of text: emphasis, code, links and images (``[``), table cells;
``<``, ``>`` and ``&`` are HTML-escaped."""
PAPER_URL = "https://arxiv.org/abs/2506.06607"
PAPER = (
    "Goddard & Fernandes Neto (2025), *Training-Free Tokenizer Transplantation via "
    f"Orthogonal Matching Pursuit*, [arXiv:2506.06607]({PAPER_URL})"
)
MERGEKIT_URL = "https://github.com/arcee-ai/mergekit"
TAGS = ["mergekit", "mergekit-omp", "tokenizer-transplant"]
COUNT_COLUMNS = [
    ("exact", "exact"),
    ("byte", "byte"),
    ("special", "special"),
    ("prefix", "prefix"),
    ("approximated", "approximated"),
    ("junk", "zeroed"),
]

CARD_TEMPLATE = """---
{metadata}
---
# {name}

This model is {base} with the tokenizer of {donor} (the tokenizer's source), transplanted
without training by mergekit-omp, a plugin for [mergekit]({mergekit_url}).
{tokenizer_note}
## Method

{method_note}

## Match statistics

{statistics}

## Recipe

The following recipe produced this model. It is saved in this directory as
`{recipe_file}`; re-running it gives the same weights:

    mergekit-omp-yaml {recipe_file} NEW_OUT

(relative model paths are read beside the recipe, then from the current directory).

{fence}yaml
{recipe}
{fence}
"""

OMP_NOTE = (
    "Each new token's donor embedding is written as a sparse combination of *k* anchor "
    "tokens, tokens both vocabularies share, chosen by Orthogonal Matching Pursuit in the "
    "donor's embedding space; the same coefficients applied to the base model's rows of "
    "those anchors give its new row ({paper})."
)


BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)  # noqa: E501
"""Characters that reorder the text around them when shown."""


def _escaped_control(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def without_controls(text: str) -> str:
    """``text`` with every control character but newline and tab (ESC of a terminal colour,
    a bidirectional override, a line separator) written as its escape (``\\x1b``), so that
    what a card shows is what it holds."""
    return "".join(
        _escaped_control(c)
        if c not in "\n\t" and (unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS)
        else c
        for c in text
    )


def is_hub_id(model: str) -> bool:
    """A model id on a hub (``owner/name``), as opposed to a local directory."""
    return not os.path.exists(model) and HUB_ID_RE.match(model) is not None


def output_recipe(options: TransplantOptions) -> str:
    """The recipe written into the output: local model paths made absolute, so running it
    from anywhere on this machine gives the same weights."""
    paths = {
        key: os.path.abspath(getattr(options, key))
        for key in ("base_model", "donor")
        if os.path.exists(getattr(options, key))
    }
    header = f"# mergekit-omp-yaml {RECIPE_FILE} NEW_OUT: the recipe that made this model"
    return recipe_yaml(options.model_copy(update=paths), header=header)


def markdown_text(text: str) -> str:
    """``text`` as literal Markdown: HTML escaped, Markdown punctuation backslashed, one line."""
    escaped = html.escape(" ".join(text.split("\n")), quote=False)
    return MARKDOWN_PUNCTUATION.sub(r"\\\1", escaped)


def model_md(model: str) -> str:
    if is_hub_id(model):
        return f"[{model}](https://huggingface.co/{model})"
    return markdown_text(model)


def card_data(report: TransplantReport) -> ModelCardData:
    base = report.base_model if is_hub_id(report.base_model) else None
    return ModelCardData(base_model=base, library_name="transformers", tags=TAGS)


def _method_md(name: str) -> tuple[str, str]:
    """(linked pretty name, one-line description) of an approximator."""
    try:
        method = get_approximator(name)
    except TransplantError:
        return f"`{name}`", ""
    title = method.pretty_name or method.name
    linked = f"[{title}]({method.reference_url})" if method.reference_url else title
    return linked, method.description


def method_note(matrices: list[MatrixReport]) -> str:
    lines = [
        "Tokens both vocabularies share, matched by the bytes they stand for, keep the base "
        "model's rows (*exact* and *byte* matches, which also serve as anchors; special tokens "
        "are matched by role, *prefix* matches copy the row of the longest shared prefix). "
        "Every other donor token is *approximated*:"
    ]
    lines.append("")
    for m in matrices:
        linked, description = _method_md(m.method)
        params = ", ".join(
            markdown_text(f"{k}={v}") for k, v in m.parameters.items() if v is not None
        )
        detail = f" ({params})" if params else ""
        lines.append(f"* {m.matrix}: {linked}{detail}{': ' + description if description else ''}")
        if m.choice is not None:
            scores = ", ".join(f"`{c}` {s:.4f}" for c, s in m.choice.scores.items())
            lines.append(
                f"  `auto` chose `{m.choice.chosen}` from {len(m.choice.scores)} "
                f"candidates by {m.choice.validation} ({m.choice.evidence}): {scores}"
            )
    if any(m.method == "omp" for m in matrices):
        lines.extend(["", OMP_NOTE.format(paper=PAPER)])
    else:
        lines.extend(["", f"The transplant method is described in {PAPER}."])
    lines.extend(
        [
            "",
            "The model has not been trained after the transplant: expect some loss of quality, "
            "mostly on text that the new tokens split differently.",
        ]
    )
    return "\n".join(lines)


def statistics_md(report: TransplantReport) -> str:
    header = ["matrix", "tensor", *(label for _, label in COUNT_COLUMNS), "anchors"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in report.matrices:
        counts = [str(m.counts.get(key, 0)) for key, _ in COUNT_COLUMNS]
        rows.append("| " + " | ".join([m.matrix, f"`{m.tensor}`", *counts, str(m.anchors)]) + " |")
    tied = "yes" if report.tied_embeddings else "no"
    lines = [*rows, "", f"Vocabulary size: {report.vocab_size}; tied embeddings: {tied}."]
    lines.extend(f"\n> Warning: {markdown_text(warning)}" for warning in report.warnings)
    return "\n".join(lines)


def code_fence(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text``, so the block holds it all."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def tokenizer_note(differences: list[str]) -> str:
    """What the output tokenizer does differently from the donor's, if anything."""
    if not differences:
        return ""
    items = "\n".join(f"* {markdown_text(d)}" for d in differences)
    return f"\nThe output tokenizer differs from the donor's:\n\n{items}\n"


def model_card(
    report: TransplantReport,
    recipe: str,
    name: str | None = None,
    tokenizer_differences: list[str] | None = None,
) -> str:
    """The README.md of a transplanted model: front matter, method, statistics, recipe."""
    content = CARD_TEMPLATE.format(
        metadata=card_data(report).to_yaml(),
        name=markdown_text(name or "Transplanted model"),
        base=model_md(report.base_model),
        donor=model_md(report.donor),
        tokenizer_note=tokenizer_note(tokenizer_differences or []),
        mergekit_url=MERGEKIT_URL,
        method_note=method_note(report.matrices),
        statistics=statistics_md(report),
        recipe=recipe.rstrip(),
        fence=code_fence(recipe),
        recipe_file=RECIPE_FILE,
    )
    return str(ModelCard(without_controls(content)))
