"""Model card: the README.md written into every output directory, in the style of mergekit's
merge cards, so the directory can be pushed to a model hub as it is."""

from __future__ import annotations

import os

import yaml

from mergekit_omp.approximators import get_approximator
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import HUB_ID_RE
from mergekit_omp.report import MatrixReport, TransplantReport

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
{metadata}---
# {name}

This model is {base} with the tokenizer of {donor}, transplanted without training by
mergekit-omp, a plugin for [mergekit]({mergekit_url}).

## Method

{method_note}

## Match statistics

{statistics}

## Recipe

The following recipe produced this model (run it with `mergekit-omp-yaml recipe.yml OUT`):

```yaml
{recipe}
```
"""

OMP_NOTE = (
    "Each new token's donor embedding is written as a sparse combination of *k* anchor "
    "tokens, tokens both vocabularies share, chosen by Orthogonal Matching Pursuit in the "
    "donor's embedding space; the same coefficients applied to the base model's rows of "
    "those anchors give its new row ({paper})."
)


def is_hub_id(model: str) -> bool:
    """A model id on a hub (``owner/name``), as opposed to a local directory."""
    return not os.path.exists(model) and HUB_ID_RE.match(model) is not None


def model_md(model: str) -> str:
    return f"[{model}](https://huggingface.co/{model})" if is_hub_id(model) else f"`{model}`"


def front_matter(report: TransplantReport) -> str:
    hub_models = [m for m in dict.fromkeys((report.base_model, report.donor)) if is_hub_id(m)]
    metadata = {"base_model": hub_models, "library_name": "transformers", "tags": TAGS}
    return yaml.safe_dump(metadata, sort_keys=False)


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
        params = ", ".join(f"{k}={v}" for k, v in m.parameters.items() if v is not None)
        detail = f" ({params})" if params else ""
        lines.append(f"* {m.matrix}: {linked}{detail}{': ' + description if description else ''}")
        if m.choice:
            scores = ", ".join(f"`{c}` {s:.4f}" for c, s in m.choice["scores"].items())
            lines.append(
                f"  chosen by `auto` from {len(m.choice['scores'])} candidates, "
                f"{m.choice['validation']} ({m.choice['held_out']} tokens): {scores}"
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
    lines.extend(f"\n> Warning: {warning}" for warning in report.warnings)
    return "\n".join(lines)


def model_card(report: TransplantReport, recipe: str, name: str | None = None) -> str:
    """The README.md of a transplanted model: front matter, method, statistics, recipe."""
    return CARD_TEMPLATE.format(
        metadata=front_matter(report),
        name=name or "Transplanted model",
        base=model_md(report.base_model),
        donor=model_md(report.donor),
        mergekit_url=MERGEKIT_URL,
        method_note=method_note(report.matrices),
        statistics=statistics_md(report),
        recipe=recipe.rstrip(),
    )
