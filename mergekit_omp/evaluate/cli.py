"""``mergekit-omp-eval BASE DONOR [-a METHOD ...]``: which method should I use for this pair?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_omp.approximators.base import DEFAULT_BATCH_SIZE
from mergekit_omp.cli_support import run_cli_action
from mergekit_omp.errors import TransplantError
from mergekit_omp.evaluate.compare import compare_methods, parse_method_spec
from mergekit_omp.evaluate.leave_out import HoldoutLike
from mergekit_omp.match import MatchPolicy


def parse_holdout(value: str | None) -> float | None:
    if value is None:
        return None
    text = value.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise TransplantError(
            f"--holdout must be a count, a fraction or a percentage, got '{value}'"
        ) from None


@click.command("mergekit-omp-eval", cls=PrettyPrintHelp)
@click.argument("base_model", type=str)
@click.argument("donor", type=str)
@click.option(
    "--approximation-method",
    "-a",
    "methods",
    multiple=True,
    metavar="NAME[:PARAM=VALUE,...]",
    help="A method to compare (repeatable), with parameters if wanted, e.g. "
    "-a omp:k=32 -a wechsel. Default: every installed method.",
)
@click.option(
    "--holdout",
    type=str,
    default=None,
    metavar="N|FRACTION|PERCENT%",
    help="Anchors to hold out: a count (1000), a fraction (0.05) or a percentage "
    "(5%). Default: 1,000 or 5% of the anchors, whichever is smaller.",
)
@click.option(
    "--holdout-like",
    type=click.Choice(["random", "new"]),
    default="random",
    show_default=True,
    help="Which anchors to hold out: a seeded random sample, or those nearest (donor "
    "space) to the most new tokens.",
)
@click.option(
    "--byte-match/--no-byte-match",
    default=False,
    show_default=True,
    help="Count single-byte tokens matched across encodings as anchors, as "
    "mergekit-omp -bm yes does.",
)
@click.option(
    "--batch-size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Tokens approximated per batch. -1 for one batch.",
)
@click.option(
    "--text",
    "text_path",
    type=str,
    default=None,
    metavar="FILE",
    help="Also measure bits per byte on this UTF-8 text: the base model with its "
    "tokenizer, and each method's transplant with the tokenizer mergekit-omp writes "
    "(the donor's, inserting BOS as the base expects).",
)
@click.option(
    "--max-bytes",
    type=click.IntRange(min=1),
    default=None,
    help="Use only the first N bytes of --text.",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens per bits-per-byte window (default 1024, capped by the model's context).",
)
@click.option(
    "--bos",
    default="auto",
    show_default=True,
    help="What precedes each bits-per-byte window: auto (BOS if the tokenizer adds "
    "one), none, or a token id or token string.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write every figure as JSON to this path.",
)
@add_merge_options
@run_cli_action
def main(
    base_model: str,
    donor: str,
    methods: tuple[str, ...],
    holdout: str | None,
    holdout_like: HoldoutLike,
    byte_match: bool,
    batch_size: int,
    text_path: str | None,
    max_bytes: int | None,
    window: int | None,
    bos: str,
    json_path: str | None,
    merge_options: MergeOptions,
    **_: Any,
) -> None:
    """Rank approximation methods for giving BASE_MODEL the tokenizer of DONOR.

    Leave-out validation: a seeded random sample of the tokens both models share is held
    out, approximated from the other shared tokens by each method, and compared with the
    true base rows (mean cosine similarity and relative L2 error, per matrix). With --text,
    bits per byte of the base and of each transplanted model on that text. The seed is
    --random-seed (default 0): the same seed gives the same figures.
    """
    merge_options.apply_global_options()
    specs = [parse_method_spec(spec) for spec in methods] or None
    report = compare_methods(
        base_model,
        donor,
        specs,
        holdout=parse_holdout(holdout),
        like=holdout_like,
        seed=merge_options.random_seed or 0,
        policy=MatchPolicy(byte_match=byte_match),
        batch_size=batch_size if batch_size > 0 else None,
        text_path=text_path,
        max_bytes=max_bytes,
        window=window,
        bos=bos,
        merge_options=merge_options,
        progress=not merge_options.quiet,
    )
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    click.echo(report.table())
    if all(result.error for result in report.methods):
        raise TransplantError("every method failed")
