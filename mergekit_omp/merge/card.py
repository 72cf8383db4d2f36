"""The README.md of a merge: mergekit's merge card plus the rows mergekit-omp made."""

from __future__ import annotations

import yaml
from mergekit.card import CARD_TEMPLATE, method_md

from mergekit_omp.card import PAPER, is_hub_id, without_controls
from mergekit_omp.merge.config import OmpMergeConfig
from mergekit_omp.merge.omp_vocabulary_task import OmpFill

TAGS = ["mergekit", "merge", "mergekit-omp"]

OMP_SECTION = """### Token embeddings

Where a model lacks a token of the merged vocabulary, mergekit-omp gave it that model's own
approximation of the token instead of another model's row (a row from a different embedding
space), made as a tokenizer transplant makes one ({paper}): the lacking model is the base, the
model that has the token the donor, and the tokens both models share are the anchors. `omp`
writes the donor's row by Orthogonal Matching Pursuit as a sparse combination of *k* anchors
and applies the same coefficients to the lacking model's rows of those anchors; `auto` runs
each of its candidate methods and keeps the one whose rows give the lacking model, with the
merged tokenizer, bits per byte least far behind the best on its worst kind of validation
text.

{table}

"""


def method_text(fill: OmpFill) -> str:
    """``omp``, ``fvt``, ``auto: hybrid`` (the chosen candidate)."""
    return f"{fill.method}: `{fill.choice.chosen}`" if fill.choice is not None else fill.method


def choice_line(fill: OmpFill) -> str:
    """What ``auto`` chose for one fill, from which candidates, with their scores."""
    choice = fill.choice
    assert choice is not None  # listed only for fills auto chose
    scores = ", ".join(f"`{spec}` {score:.4f}" for spec, score in choice.scores.items())
    return (
        f"* `{fill.tensor}` of {fill.model}: `auto` chose `{choice.chosen}` from "
        f"{len(choice.scores)} candidates by {choice.validation} "
        f"({choice.evidence}): {scores}"
    )


def fills_table(fills: list[OmpFill]) -> str:
    if not fills:
        return "No model lacked a token that mergekit-omp was asked to fill."
    lines = [
        "| tensor | model | rows | approximated from | k | anchors | method |",
        "|---|---|---|---|---|---|---|",
    ]
    for fill in fills:
        k = "-" if fill.k is None else fill.k
        lines.append(
            f"| `{fill.tensor}` | {fill.model} | {fill.tokens} | {fill.source} | {k} | "
            f"{fill.anchors} | {method_text(fill)} |"
        )
    choices = [choice_line(fill) for fill in fills if fill.choice is not None]
    if choices:
        lines.extend(["", *choices])
    return "\n".join(lines)


def merge_card(config: OmpMergeConfig, fills: list[OmpFill], name: str) -> str:
    written = config.written
    hub_models = [written_path for written_path, path in config.models.items() if is_hub_id(path)]
    base = written.base_model if written.merge_method != "slerp" else None
    base_text = f" using {base} as a base" if base else ""
    bullets = [f"* {model}" for model in config.models if base is None or model != str(base)]
    card = CARD_TEMPLATE.format(
        metadata=yaml.safe_dump(
            {"base_model": hub_models, "tags": TAGS, "library_name": "transformers"},
            sort_keys=False,
        ).rstrip(),
        model_list="\n".join(bullets),
        base_text=base_text,
        merge_method=method_md(written.merge_method),
        name=name,
        config_yaml=config.text.rstrip(),
    )
    section = OMP_SECTION.format(paper=PAPER, table=fills_table(fills))
    card = card.replace("### Configuration", section + "### Configuration", 1)
    card = card.replace(
        "The following YAML configuration was used to produce this model:",
        "The following YAML configuration was used to produce this model with "
        "`mergekit-omp-merge`:",
        1,
    )
    return without_controls(card)
