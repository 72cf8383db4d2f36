"""``mergekit-omp BASE DONOR OUT``: a drop-in for ``mergekit-tokensurgeon``.

It accepts the arguments of mergekit-tokensurgeon 0.1.5 with the same meaning (``-c``,
``-w`` and ``-s`` only with a method that uses them), plus ``--overwrite``,
``--pad-vocab-to-multiple-of``, ``--report``, ``--param`` and ``-a NAME:PARAM=VALUE``.
"""

from __future__ import annotations

from typing import Any

import click
from mergekit.options import MergeOptions

from mergekit_omp.cli.options import (
    READ_OPTIONS,
    SUMMARY_HELP,
    WRITE_OPTIONS,
    merge_options,
    out_path_argument,
    overwrite_option,
    report_option,
    transplant_options,
    transplant_options_from_cli,
)
from mergekit_omp.cli.outputs import check_outputs, echo_summary
from mergekit_omp.cli.process import command_class, run_cli_action
from mergekit_omp.recipe import recipe_yaml
from mergekit_omp.transplant import transplant

RECIPE_HEADER = "# mergekit-omp-yaml THIS_FILE OUT (model paths as given on the command line)"


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
