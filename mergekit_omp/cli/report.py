"""``mergekit-omp-report BASE DONOR``: the diagnostics of a transplant, without writing it.

Runs load, match, approximate and the audit with the same flags as ``mergekit-omp``, then
prints the summary (number schemes, flagged rows) and optionally writes the JSON report and
a PNG of the distributions.
"""

from __future__ import annotations

from typing import Any

import click
from mergekit.options import MergeOptions

from mergekit_omp.cli.options import (
    READ_OPTIONS,
    json_report_options,
    merge_options,
    output_file_option,
    report_flag,
    report_path_of,
    transplant_options,
    transplant_options_from_cli,
)
from mergekit_omp.cli.outputs import check_outputs
from mergekit_omp.cli.process import command_class, run_cli_action
from mergekit_omp.diagnostics.plot import plot_audits, require_matplotlib
from mergekit_omp.transplant import transplant


@click.command("mergekit-omp-report", cls=command_class())
@click.argument("base_model", type=str)
@click.argument("donor", type=str)
@transplant_options
@json_report_options
@output_file_option(
    "--plot",
    "plot_path",
    help_text="Write a PNG of the base-norm and residual distributions with the flagged "
    "tokens marked (needs matplotlib: pip install 'mergekit-omp[plot]').",
)
@merge_options(*READ_OPTIONS)
@click.pass_context
@run_cli_action
def main(
    ctx: click.Context,
    base_model: str,
    donor: str,
    report_path: str | None,
    json_path: str | None,
    plot_path: str | None,
    merge_options: MergeOptions,
    **values: Any,
) -> None:
    """Audit giving BASE_MODEL the tokenizer of DONOR; no model is written.

    Reports both tokenizers' number schemes (and warns when they differ) and audits every
    approximated row for breaker tokens: donor residual, coefficient L1 and conditioning,
    base-row norm z-score and LM-head salience. Takes the flags of mergekit-omp, so the
    audit is of exactly the transplant that command would make.
    """
    merge_options.apply_global_options()
    flag = report_flag(report_path, json_path)
    report_path = report_path_of(report_path, json_path)
    check_outputs(files={flag: report_path, "--plot": plot_path}, inputs=(base_model, donor))
    if plot_path is not None:
        require_matplotlib()  # fail before the slow part, not after
    options = transplant_options_from_cli(ctx, base_model, donor, values, merge_options)
    result = transplant(
        options,
        None,
        merge_options=merge_options,
        report_path=report_path,
        progress=not merge_options.quiet,
    )
    if plot_path is not None:
        diagnoses = [m.diagnosis for m in result.matrices.values() if m.diagnosis is not None]
        plot_audits(
            {d.audit.matrix: d.audit for d in diagnoses},
            diagnoses[0].vocabulary if diagnoses else None,
            plot_path,
        )
    click.echo(result.report.summary(verbose=True))
