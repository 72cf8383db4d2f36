"""``mergekit-omp-merge CONFIG.yml OUT``: mergekit-yaml with OMP rows for missing tokens."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from mergekit.options import MergeOptions, add_merge_options
from pydantic_core import to_jsonable_python

from mergekit_omp.cli.options import (
    out_path_argument,
    overwrite_option,
    report_option,
    strict_merge_types,
)
from mergekit_omp.cli.outputs import check_outputs
from mergekit_omp.cli.process import command_class, run_cli_action
from mergekit_omp.merge.config import load_merge_config
from mergekit_omp.merge.omp_vocabulary_task import OmpFill
from mergekit_omp.merge.run import run_omp_merge


def summary(fills: list[OmpFill]) -> str:
    if not fills:
        return "Merged; no token rows were made by mergekit-omp"
    lines = ["Merged; token rows made by mergekit-omp:"]
    lines.extend(
        f"  {f.tensor}: {f.tokens} rows of {f.model} from {f.source} ({fill_method(f)}, "
        f"{f.anchors} anchors)"
        for f in fills
    )
    return "\n".join(lines)


def fill_method(fill: OmpFill) -> str:
    """``omp k=64``, ``fvt``, or what ``auto`` chose and its score, as a transplant's summary
    says it (every candidate's score is in the model card and the --report file)."""
    if fill.choice is not None:
        chosen, scores = fill.choice.chosen, fill.choice.scores
        measure = fill.choice.validation.split(",")[0].split(";")[0]
        return f"auto chose {chosen}, {measure} {scores[chosen]:.4f}, best of {len(scores)}"
    return fill.method if fill.k is None else f"{fill.method} k={fill.k}"


@click.command("mergekit-omp-merge", cls=command_class())
@click.argument("config_file", type=str)
@out_path_argument
@overwrite_option
@report_option
@strict_merge_types
@add_merge_options
@run_cli_action
def main(
    config_file: str,
    out_path: str,
    overwrite: bool,
    report_path: str | None,
    merge_options: MergeOptions,
) -> None:
    """Run the mergekit merge in CONFIG_FILE and write the merged model to OUT_PATH.

    Exactly mergekit-yaml's merge, with one more token-embedding source: a token a model
    lacks can get that model's own approximation, anchored on the tokens it shares with
    a model that has the token, instead of that model's row. Per token, under
    `tokenizer.tokens`: `"<tok>": {source: {kind: omp, k: 32}}`; for every missing token, a
    top-level `omp: {missing_tokens: omp}`, approximated by `method` (default auto: of its
    candidate methods, the one least far behind the best on its worst of five kinds of
    validation text, in bits per byte) with its `parameters`, as in a recipe. Relative model paths are read from the config's
    directory first.
    """
    merge_options.apply_global_options()
    config = load_merge_config(config_file)
    check_outputs(
        out_path,
        overwrite,
        {"--report": report_path},
        inputs=(config_file, *config.models.values()),
    )
    fills = run_omp_merge(config, out_path, merge_options, overwrite=overwrite)
    if report_path is not None:
        report = {"config": config_file, "out": out_path, "omp_rows": [asdict(f) for f in fills]}
        # A failed auto candidate scores inf: null in strict JSON, as in mergekit-omp's report.
        strict = to_jsonable_python(report, inf_nan_mode="null")
        Path(report_path).write_text(json.dumps(strict, indent=2) + "\n", encoding="utf-8")
    if not merge_options.quiet:
        click.echo(summary(fills), err=True)
