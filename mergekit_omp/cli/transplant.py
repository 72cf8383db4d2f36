"""``mergekit-omp BASE DONOR OUT``: a drop-in for ``mergekit-tokensurgeon``.

It accepts the arguments of mergekit-tokensurgeon 0.1.5 with the same meaning (``-c``,
``-w`` and ``-s`` only with a method that uses them), plus ``--overwrite``,
``--pad-vocab-to-multiple-of``, ``--report``, ``--param`` and ``-a NAME:PARAM=VALUE``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click
import yaml
from mergekit.options import MergeOptions
from pydantic import ValidationError

from mergekit_omp.approximators import approximator_names, split_method_spec
from mergekit_omp.cli.common import (
    check_outputs,
    command_class,
    echo_summary,
    out_path_argument,
    overwrite_option,
    report_option,
    run_cli_action,
)
from mergekit_omp.cli.options import (
    METHOD_METAVAR,
    READ_OPTIONS,
    SUMMARY_HELP,
    WRITE_OPTIONS,
    BatchSize,
    bos_option,
    byte_match_option,
    knob_values,
    merge_options,
    method_knob_options,
    option_choices,
    option_default,
    parameters_for,
    prefix_match_option,
)
from mergekit_omp.errors import TransplantError
from mergekit_omp.options import (
    MatchScope,
    TransplantOptions,
    describe_validation_error,
    recipe_yaml,
)
from mergekit_omp.transplant import transplant

LOG = logging.getLogger("mergekit_omp")


def parse_param(values: tuple[str, ...]) -> dict[str, Any]:
    params = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got '{item}'", param_hint="--param")
        params[key.strip()] = yaml.safe_load(raw)
    return params


def method_parameters(
    method: str, knobs: dict[str, Any], explicit: dict[str, Any], spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Knob flags the method takes, then ``-a NAME:PARAM=VALUE`` and ``--param`` (which win)."""
    return parameters_for(method, knobs, spec or {}, explicit)


def transplant_options_from_cli(
    ctx: click.Context, base: str, donor: str, values: dict[str, Any], merge_options: MergeOptions
) -> TransplantOptions:
    method, spec = split_method_spec(values["approximation_method"])
    try:
        return _options(ctx, base, donor, method, spec, values, merge_options)
    except ValidationError as exc:
        raise TransplantError(describe_validation_error(exc)) from None


def _options(
    ctx: click.Context,
    base: str,
    donor: str,
    method: str,
    spec: dict[str, Any],
    values: dict[str, Any],
    merge_options: MergeOptions,
) -> TransplantOptions:
    return TransplantOptions(
        base_model=base,
        donor=donor,
        method=method,
        parameters=method_parameters(
            method, knob_values(ctx, values), parse_param(values["param"]), spec
        ),
        prefix_match=MatchScope(values["prefix_match"]),
        byte_match=MatchScope(values["byte_match"]),
        magikarp=values["magikarp"],
        new_vocab_noise=values["new_vocab_noise"],
        new_vocab_scale=values["new_vocab_scale"],
        pad_vocab_to_multiple_of=values["pad_vocab_to_multiple_of"],
        batch_size=values["batch_size"],
        dtype=values["dtype"],
        bos=values["bos"],
        seed=merge_options.random_seed or 0,
        guard=values["guard"],
    )


RECIPE_HEADER = "# mergekit-omp-yaml THIS_FILE OUT (model paths as given on the command line)"


def transplant_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The method and matching flags, named as in mergekit-tokensurgeon."""
    decorators: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--approximation-method",
            "-a",
            metavar=METHOD_METAVAR,
            default=option_default("method"),
            show_default=True,
            help="Method for the rows of donor tokens the base lacks, with parameters if "
            "wanted (-a omp:k=8 is -a omp -k 8): " + ", ".join(approximator_names()) + ".",
        ),
        method_knob_options,
        click.option(
            "--batch-size",
            type=BatchSize(),
            default=option_default("batch_size"),
            show_default=True,
            help="Tokens approximated per batch. -1 for one batch. For omp an upper bound: "
            "it sizes its chunks from its memory budget (-p memory_gb=GB).",
        ),
        prefix_match_option,
        byte_match_option,
        click.option(
            "--magikarp/--no-magikarp",
            default=option_default("magikarp"),
            show_default=True,
            help="Ignore under-trained tokens when matching (arXiv 2405.05417).",
        ),
        click.option(
            "--new-vocab-noise",
            "-nvn",
            type=click.FloatRange(min=0),
            default=option_default("new_vocab_noise"),
            help="Add Gaussian noise of this std to approximated rows.",
        ),
        click.option(
            "--new-vocab-scale",
            "-nvs",
            type=float,
            default=option_default("new_vocab_scale"),
            help="Scale approximated rows by this factor.",
        ),
        click.option(
            "--param",
            "-p",
            multiple=True,
            metavar="NAME=VALUE",
            help="A method parameter (repeatable), e.g. -p k=32; wins over -a NAME:... and "
            "-k/-c/-w/-s.",
        ),
        click.option(
            "--pad-vocab-to-multiple-of",
            type=click.IntRange(min=1),
            default=option_default("pad_vocab_to_multiple_of"),
            help="Pad the new vocabulary with zero rows to a multiple of N (64, 128).",
        ),
        bos_option,
        click.option(
            "--dtype",
            type=click.Choice(option_choices("dtype")),
            default=option_default("dtype"),
            help="Dtype of the new matrices (default: the base model's).",
        ),
        click.option(
            "--guard",
            type=click.Choice(option_choices("guard")),
            default=option_default("guard"),
            show_default=True,
            help="What to do with approximated rows the audit flags as outliers "
            "(breaker tokens, arXiv 2601.00065): clip them to the base norm bound, "
            "shrink their coefficients (ridge), or leave them; the audit always "
            "runs and warns (docs/diagnostics.md).",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


@click.command("mergekit-omp", cls=command_class())
@click.argument("base_model", type=str)
@click.argument("donor", type=str)
@out_path_argument
@transplant_options
@overwrite_option
@report_option
@click.option(
    "--print-recipe",
    is_flag=True,
    default=False,
    help="Print the YAML recipe of this command line (for mergekit-omp-yaml) and exit.",
)
@merge_options(*READ_OPTIONS, *WRITE_OPTIONS, help_overrides=SUMMARY_HELP)
@click.pass_context
@run_cli_action
def main(
    ctx: click.Context,
    base_model: str,
    donor: str,
    out_path: str,
    overwrite: bool,
    report_path: str | None,
    print_recipe: bool,
    merge_options: MergeOptions,
    **values: Any,
) -> None:
    """Give BASE_MODEL the tokenizer of DONOR and write the result to OUT_PATH.

    Rows of tokens both vocabularies share (matched by the bytes they stand for) are copied;
    the others are approximated, by default with Orthogonal Matching Pursuit over the shared
    tokens (arXiv 2506.06607).
    """
    merge_options.apply_global_options()
    options = transplant_options_from_cli(ctx, base_model, donor, values, merge_options)
    if print_recipe:
        click.echo(recipe_yaml(options, header=RECIPE_HEADER), nl=False)
        return
    check_outputs(out_path, overwrite, {"--report": report_path}, inputs=(base_model, donor))
    result = transplant(
        options,
        out_path,
        merge_options=merge_options,
        overwrite=overwrite,
        report_path=report_path,
    )
    echo_summary(result.report, out_path, merge_options)
