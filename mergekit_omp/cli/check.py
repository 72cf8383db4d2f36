"""``mergekit-omp-check OUT TARGET``: can OUT serve as a draft model for TARGET?"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergekit_omp.check import check_draft
from mergekit_omp.cli.options import output_file_option
from mergekit_omp.cli.outputs import check_outputs
from mergekit_omp.cli.process import command_class, run_cli_action


@click.command("mergekit-omp-check", cls=command_class())
@click.argument("out_path", type=str)
@click.argument("target", type=str)
@output_file_option(
    "--report",
    "report_path",
    help_text="Also write every check and the verdicts as JSON to this path.",
)
@click.option(
    "--trust-remote-code/--no-trust-remote-code",
    default=False,
    show_default=True,
    help="Allow custom tokenizer code from the model directories.",
)
@run_cli_action
def main(out_path: str, target: str, report_path: str | None, trust_remote_code: bool) -> None:
    """Can OUT_PATH serve as a draft model for TARGET?

    Compares vocabulary size, token strings, special-token ids, BOS/EOS insertion, chat
    template and the token ids of sample texts, and says for transformers assisted
    generation, vLLM and llama.cpp whether the pair works. Exit code 0 when it works in
    all three, 1 when not. Reads configs and tokenizers only.
    """
    check_outputs(files={"--report": report_path}, inputs=(out_path, target))
    result = check_draft(out_path, target, trust_remote_code)
    if report_path is not None:
        Path(report_path).write_text(json.dumps(result.as_json(), indent=2) + "\n")
    click.echo("\n".join(result.lines()))
    if not all(result.compatible.values()):
        raise SystemExit(1)
