"""``mergekit-omp-yaml RECIPE OUT``: run the transplant a recipe file describes.

A recipe is the YAML form of :class:`~mergekit_omp.options.TransplantOptions` (read and
written by ``recipe.load_recipe`` and ``recipe.recipe_yaml``); relative model paths are
read from the recipe's directory (``paths.resolve_model_path``).
"""

from __future__ import annotations

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
)
from mergekit_omp.cli.outputs import check_outputs, echo_summary
from mergekit_omp.cli.process import command_class, run_cli_action
from mergekit_omp.recipe import MODEL_KEYS, Recipe, load_recipe
from mergekit_omp.transplant import transplant


def with_seed(recipe: Recipe, seed: int | None) -> Recipe:
    """Apply ``--random-seed`` unless the recipe sets ``seed`` itself."""
    if seed is None or "seed" in recipe.written.model_fields_set:
        return recipe
    return Recipe(
        path=recipe.path,
        options=recipe.options.model_copy(update={"seed": seed}),
        written=recipe.written.model_copy(update={"seed": seed}),
    )


def run_recipe(
    recipe_file: str,
    out_path: str,
    *,
    overwrite: bool,
    report_path: str | None,
    merge_options: MergeOptions,
) -> None:
    merge_options.apply_global_options()
    recipe = with_seed(load_recipe(recipe_file), merge_options.random_seed)
    inputs = (recipe_file, *(getattr(recipe.options, key) for key in MODEL_KEYS))
    check_outputs(out_path, overwrite, {"--report": report_path}, inputs=inputs)
    result = transplant(
        recipe.options,
        out_path,
        merge_options=merge_options,
        overwrite=overwrite,
        report_path=report_path,
    )
    echo_summary(result.report, out_path, merge_options)


@click.command("mergekit-omp-yaml", cls=command_class())
@click.argument("recipe_file", type=str)
@out_path_argument
@overwrite_option
@report_option
@merge_options(*READ_OPTIONS, *WRITE_OPTIONS, help_overrides=SUMMARY_HELP)
@run_cli_action
def main(
    recipe_file: str,
    out_path: str,
    overwrite: bool,
    report_path: str | None,
    merge_options: MergeOptions,
) -> None:
    """Run the tokenizer transplant described by RECIPE_FILE and write the model to OUT_PATH.

    The recipe holds the keys of a mergekit-omp command line (base_model, donor, method,
    parameters, embed/lm_head overrides, byte_match, prefix_match, magikarp, dtype, ...);
    `mergekit-omp BASE DONOR OUT --print-recipe` prints the recipe of a command line.
    Relative model paths are read from the recipe's directory first. mergekit's options
    (--cuda, --lazy-unpickle, ...) apply as for mergekit-yaml; --random-seed applies when
    the recipe has no `seed`.
    """
    run_recipe(
        recipe_file,
        out_path,
        overwrite=overwrite,
        report_path=report_path,
        merge_options=merge_options,
    )
