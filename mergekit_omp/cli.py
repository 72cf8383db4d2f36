"""``mergekit-omp BASE DONOR OUT``: a drop-in for ``mergekit-tokensurgeon``.

It accepts every argument of mergekit-tokensurgeon 0.1.5 with the same meaning, plus
``--overwrite``, ``--pad-vocab-to-multiple-of``, ``--report`` and ``--param``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click
import yaml
from click.core import ParameterSource
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options
from mergekit.tokensurgeon import SubwordMethod, WeightingScheme
from pydantic import ValidationError

from mergekit_omp.approximators import approximator_names, get_approximator
from mergekit_omp.approximators.base import DEFAULT_BATCH_SIZE
from mergekit_omp.approximators.omp import DEFAULT_K
from mergekit_omp.bos import BosPolicy
from mergekit_omp.cli_support import (
    one_shot_entry_point,
    overwrite_option,
    report_option,
    run_cli_action,
)
from mergekit_omp.errors import TransplantError
from mergekit_omp.options import MatchScope, TransplantOptions, describe_options_error
from mergekit_omp.recipe import recipe_yaml
from mergekit_omp.report import TransplantReport
from mergekit_omp.transplant import transplant

LOG = logging.getLogger("mergekit_omp")

# mergekit-tokensurgeon flags that are parameters of some methods: given explicitly, they are
# passed to the chosen method if it takes a parameter of that name.
METHOD_KNOBS = ("k", "cosine_similarity", "weight_scheme", "subword_method")


def parse_param(values: tuple[str, ...]) -> dict[str, Any]:
    params = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got '{item}'", param_hint="--param")
        params[key.strip()] = yaml.safe_load(raw)
    return params


def method_parameters(
    method: str, knobs: dict[str, Any], explicit: dict[str, Any]
) -> dict[str, Any]:
    """Knob flags the method takes, then ``--param`` values (which win)."""
    accepted = set(get_approximator(method).parameter_names())
    params = {name: value for name, value in knobs.items() if name in accepted}
    ignored = sorted(set(knobs) - accepted)
    if ignored:
        LOG.warning("Method '%s' takes no %s; ignored", method, ", ".join(ignored))
    params.update(explicit)
    return params


def explicit_knobs(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    knobs = {}
    for name in METHOD_KNOBS:
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            knobs[name] = values[name]
    return knobs


def transplant_options_from_cli(
    ctx: click.Context, base: str, donor: str, values: dict[str, Any], merge_options: MergeOptions
) -> TransplantOptions:
    method = values["approximation_method"]
    try:
        return _options(ctx, base, donor, method, values, merge_options)
    except ValidationError as exc:
        raise TransplantError(describe_options_error(exc)) from None


def _options(
    ctx: click.Context,
    base: str,
    donor: str,
    method: str,
    values: dict[str, Any],
    merge_options: MergeOptions,
) -> TransplantOptions:
    return TransplantOptions(
        base_model=base,
        donor=donor,
        method=method,
        parameters=method_parameters(
            method, explicit_knobs(ctx, values), parse_param(values["param"])
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


SCOPES = [s.value for s in MatchScope]
RECIPE_HEADER = "# mergekit-omp-yaml THIS_FILE OUT (model paths as given on the command line)"


def transplant_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The method and matching flags, named as in mergekit-tokensurgeon."""
    decorators = [
        click.option(
            "--k",
            "-k",
            type=int,
            default=DEFAULT_K,
            show_default=True,
            help="Number of anchor tokens per new token (sparsity of OMP; neighbours for "
            "wechsel/clp). Passed to the method only when given.",
        ),
        click.option(
            "--cosine-similarity/--no-cosine-similarity",
            "-c/-nc",
            default=False,
            show_default=True,
            help="Use cosine similarity, for methods that take `cosine_similarity`.",
        ),
        click.option(
            "--approximation-method",
            "-a",
            type=click.Choice(approximator_names()),
            default="omp",
            show_default=True,
            help="Method for approximating the rows of donor tokens the base lacks "
            "(built-ins and installed plugins).",
        ),
        click.option(
            "--weight-scheme",
            "-w",
            type=click.Choice([w.value for w in WeightingScheme]),
            default=WeightingScheme.DISTANCE_PROPORTIONAL.value,
            show_default=True,
            help="Weighting scheme, for methods that take `weight_scheme`.",
        ),
        click.option(
            "--subword-method",
            "-s",
            type=click.Choice([m.value for m in SubwordMethod]),
            default=SubwordMethod.MEAN.value,
            show_default=True,
            help="Subword pooling, for methods that take `subword_method`.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            show_default=True,
            help="Tokens approximated per batch. -1 for one batch. For omp an upper bound: "
            "it sizes its chunks from its memory budget (-p memory_gb=GB).",
        ),
        click.option(
            "--prefix-match",
            "-pm",
            type=click.Choice(SCOPES),
            default="no",
            show_default=True,
            help="Give a new token the row of its longest base-vocabulary prefix, in "
            "the named matrices (embed, lm_head, yes = both, no).",
        ),
        click.option(
            "--byte-match",
            "-bm",
            type=click.Choice(SCOPES),
            default="no",
            show_default=True,
            help="Match single-byte tokens across encodings (<0x0A> with a byte-level "
            "newline), in the named matrices.",
        ),
        click.option(
            "--magikarp/--no-magikarp",
            default=False,
            show_default=True,
            help="Ignore under-trained tokens when matching (arXiv 2405.05417).",
        ),
        click.option(
            "--new-vocab-noise",
            "-nvn",
            type=float,
            default=None,
            help="Add Gaussian noise of this std to approximated rows.",
        ),
        click.option(
            "--new-vocab-scale",
            "-nvs",
            type=float,
            default=None,
            help="Scale approximated rows by this factor.",
        ),
        click.option(
            "--param",
            "-p",
            multiple=True,
            metavar="NAME=VALUE",
            help="A method parameter (repeatable), e.g. -p k=32; wins over -k/-c/-w/-s.",
        ),
        click.option(
            "--pad-vocab-to-multiple-of",
            type=click.IntRange(min=1),
            default=None,
            help="Pad the new vocabulary with zero rows to a multiple of N (64, 128).",
        ),
        click.option(
            "--bos",
            type=click.Choice([p.value for p in BosPolicy]),
            default=BosPolicy.MATCH_BASE.value,
            show_default=True,
            help="match_base: the output tokenizer inserts a BOS token exactly when the "
            "base's tokenizer does (the donor's BOS gets the base's BOS row); "
            "keep_donor: keep the donor tokenizer's behaviour and warn.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            default=None,
            help="Dtype of the new matrices (default: the base model's).",
        ),
        click.option(
            "--guard",
            type=click.Choice(["off", "clip", "shrink"]),
            default=TransplantOptions.model_fields["guard"].default,
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


@click.command("mergekit-omp", cls=PrettyPrintHelp)
@click.argument("base_model", type=str)
@click.argument("donor", type=str)
@click.argument("out_path", type=str)
@transplant_options
@overwrite_option
@report_option
@click.option(
    "--print-recipe",
    is_flag=True,
    default=False,
    help="Print the YAML recipe of this command line (for mergekit-omp-yaml) and exit.",
)
@add_merge_options
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
    result = transplant(
        options,
        out_path,
        merge_options=merge_options,
        overwrite=overwrite,
        report_path=report_path,
    )
    echo_summary(result.report, out_path, merge_options)


def echo_summary(
    report: TransplantReport, out_path: str | None, merge_options: MergeOptions
) -> None:
    """The summary on stderr (the full audit with -v); --quiet leaves only the warnings,
    which are never hidden."""
    if merge_options.quiet:
        for warning in report.warnings:
            click.echo(f"warning: {warning}", err=True)
        return
    click.echo(report.summary(out_path, verbose=merge_options.verbosity > 0), err=True)


run = one_shot_entry_point(main)
"""The ``mergekit-omp`` console script."""
