"""``mergekit-omp-eval BASE DONOR [-a METHOD ...]``: which method should I use for this pair?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from mergekit.options import MergeOptions

from mergekit_omp.approximators import (
    MethodSpec,
    approximator_names,
    get_approximator,
    split_method_spec,
)
from mergekit_omp.approximators.base import DEFAULT_BATCH_SIZE
from mergekit_omp.cli.options import (
    METHOD_METAVAR,
    READ_OPTIONS,
    BatchSize,
    bos_option,
    byte_match_option,
    json_report_options,
    knob_values,
    merge_options,
    method_knob_options,
    parameters_for,
    prefix_match_option,
    report_flag,
    report_path_of,
)
from mergekit_omp.cli.outputs import check_outputs
from mergekit_omp.cli.process import command_class, run_cli_action
from mergekit_omp.errors import TransplantError, UsageValueError
from mergekit_omp.evaluate.compare import compare_methods, default_method_specs
from mergekit_omp.evaluate.leave_out import HoldoutLike


def method_specs(methods: tuple[str, ...], knobs: dict[str, Any]) -> list[MethodSpec] | None:
    """The methods to compare with the knobs applied (``-a omp -k 8`` is ``-a omp:k=8``);
    without ``-a``, every installed method, each with the knobs it takes."""
    if not methods:
        if not knobs:
            return None
        return [
            spec_of(spec.approximator.name, {}, knobs_taken(spec.approximator.name, knobs))
            for spec in default_method_specs()
        ]
    return [spec_of(*split_method_spec(method), knobs) for method in methods]


def knobs_taken(method: str, knobs: dict[str, Any]) -> dict[str, Any]:
    accepted = get_approximator(method).parameter_names()
    return {name: value for name, value in knobs.items() if name in accepted}


def spec_of(name: str, spec: dict[str, Any], knobs: dict[str, Any]) -> MethodSpec:
    method = get_approximator(name)
    parameters = parameters_for(name, knobs, spec)
    label = name + (":" + ",".join(f"{k}={v}" for k, v in parameters.items()) if parameters else "")
    try:
        return MethodSpec(label, method, method.validate_parameters(parameters))
    except TransplantError as exc:  # a value of the command line: exit 2
        raise UsageValueError(str(exc)) from None


def parse_holdout(value: str | None) -> float | None:
    """A count (>= 1, whole), a fraction in (0, 1) or a percentage in (0%, 100%)."""
    if value is None:
        return None
    text = value.strip()
    try:
        number = float(text.removesuffix("%"))
    except ValueError:
        number = float("nan")
    if text.endswith("%") and 0 < number < 100:
        return number / 100
    if not text.endswith("%") and (0 < number < 1 or (number >= 1 and number.is_integer())):
        return number
    raise TransplantError(
        "--holdout must be a whole count (1000), a fraction in (0, 1) (0.05) or a percentage "
        f"in (0%, 100%) (5%), got '{value}'"
    )


@click.command("mergekit-omp-eval", cls=command_class())
@click.argument("base_model", type=str)
@click.argument("donor", type=str)
@click.option(
    "--approximation-method",
    "-a",
    "methods",
    multiple=True,
    metavar=METHOD_METAVAR,
    help="A method to compare (repeatable), with parameters if wanted, e.g. "
    "-a omp:k=32 -a wechsel: " + ", ".join(approximator_names()) + ". Default: every "
    "installed method.",
)
@method_knob_options
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
@byte_match_option
@prefix_match_option
@bos_option
@click.option(
    "--batch-size",
    type=BatchSize(),
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
    "(as --bos says).",
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
    "--window-prefix",
    default="auto",
    show_default=True,
    help="What precedes each bits-per-byte window: auto (BOS if the tokenizer adds "
    "one), none, or a token id or token string.",
)
@json_report_options
@merge_options(*READ_OPTIONS)
@click.pass_context
@run_cli_action
def main(
    ctx: click.Context,
    base_model: str,
    donor: str,
    methods: tuple[str, ...],
    holdout: str | None,
    holdout_like: HoldoutLike,
    byte_match: str,
    prefix_match: str,
    bos: str,
    batch_size: int,
    text_path: str | None,
    max_bytes: int | None,
    window: int | None,
    window_prefix: str,
    report_path: str | None,
    json_path: str | None,
    merge_options: MergeOptions,
    **values: Any,
) -> None:
    """Rank approximation methods for giving BASE_MODEL the tokenizer of DONOR.

    Leave-out validation: a seeded random sample of the tokens both models share is held
    out, approximated from the other shared tokens by each method, and compared with the
    true base rows (mean cosine similarity and relative L2 error, per matrix). With --text,
    bits per byte of the base and of each transplanted model on that text. The seed is
    --random-seed (default 0): the same seed gives the same figures.
    """
    merge_options.apply_global_options()
    flag = report_flag(report_path, json_path)
    report_path = report_path_of(report_path, json_path)
    check_outputs(files={flag: report_path}, inputs=(base_model, donor, text_path or ""))
    specs = method_specs(methods, knob_values(ctx, values))
    report = compare_methods(
        base_model,
        donor,
        specs,
        holdout=parse_holdout(holdout),
        like=holdout_like,
        seed=merge_options.random_seed or 0,
        batch_size=batch_size if batch_size > 0 else None,
        text_path=text_path,
        max_bytes=max_bytes,
        window=window,
        bos=window_prefix,
        merge_options=merge_options,
        progress=not merge_options.quiet,
        transplant_choices={"byte_match": byte_match, "prefix_match": prefix_match, "bos": bos},
    )
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    click.echo(report.table())
    if all(result.error for result in report.methods):
        raise TransplantError("every method failed")
