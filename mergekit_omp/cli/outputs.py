"""A command's outputs: every one checked before any work (``check_outputs``), and the
summary printed after it (``echo_summary``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mergekit_omp import publish

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

    from mergekit_omp.report import TransplantReport


def check_outputs(
    out_path: str | None = None,
    overwrite: bool = False,
    files: dict[str, str | None] | None = None,
    *,
    inputs: tuple[str, ...] = (),
) -> None:
    """Every output of a command checked before any work: OUT (a directory published
    atomically) and the files of options such as ``--report``; none may touch an input,
    OUT or one another."""
    inputs = tuple(path for path in inputs if path)
    out = None
    if out_path is not None:
        out = publish.check_output_path(out_path, overwrite, inputs)
    given = {option: path for option, path in (files or {}).items() if path is not None}
    for option, path in given.items():
        publish.check_output_file(path, option, inputs)
    publish.refuse_clashes(given, out, out_path)


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
