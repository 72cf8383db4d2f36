"""Recipes: a transplant written as YAML, and ``mergekit-omp-yaml RECIPE OUT``.

A recipe is the YAML form of :class:`~mergekit_omp.options.TransplantOptions`: the same
keys, validated by the same frozen model the command line builds, so a recipe and a command
line mean exactly the same thing. ``mergekit-omp ... --print-recipe`` prints the recipe of a
command line::

    base_model: HuggingFaceTB/SmolLM2-135M
    donor: ./my-donor            # relative paths are read from the recipe's directory
    method: omp
    parameters: {k: 64}
    lm_head: {method: mean}
    byte_match: yes
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from mergekit.options import MergeOptions, PrettyPrintHelp
from pydantic import ValidationError

from mergekit_omp.cli_options import READ_OPTIONS, SUMMARY_HELP, WRITE_OPTIONS, merge_options
from mergekit_omp.cli_support import (
    one_shot_entry_point,
    overwrite_option,
    report_option,
    run_cli_action,
)
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import HUB_ID_RE
from mergekit_omp.options import MatchScope, MatrixOverride, TransplantOptions

MODEL_KEYS = ("base_model", "donor")
ALWAYS_WRITTEN = ("base_model", "donor", "method")
RECIPE_KEYS = tuple(TransplantOptions.model_fields)
OVERRIDE_KEYS = tuple(MatrixOverride.model_fields)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe file.

    ``options`` has the model paths resolved for this machine; ``written`` keeps them as the
    file states them (what the model card shows).
    """

    path: Path
    options: TransplantOptions
    written: TransplantOptions


def resolve_model_path(path: str, base_dir: Path) -> str:
    """Where a model named in a recipe or config lives.

    A relative path is looked up beside the file first, then in the current directory; one
    found in neither that looks like ``owner/name`` (and does not start with ``.``) is a hub
    model id.
    """
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    beside = base_dir / expanded
    if beside.exists():
        return str(beside)
    if os.path.exists(expanded):
        return expanded
    if HUB_ID_RE.match(path) and not path.startswith("."):
        return path
    return str(beside)


def _did_you_mean(key: str, candidates: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe_validation_error(
    exc: ValidationError,
    source: str,
    *,
    prefix: tuple[str, ...] = (),
    candidates: Collection[str] = (),
) -> str:
    """One line naming each offending key, such as
    ``recipe.yml: unknown key 'metod' (did you mean ...)``."""
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in (*prefix, *error["loc"]))
        if error["type"] == "extra_forbidden":
            hint = _did_you_mean(str(error["loc"][-1]), candidates)
            problems.append(f"unknown key '{loc}'{hint}")
        elif error["type"] == "missing":
            problems.append(f"missing key '{loc}'")
        else:
            problems.append(f"{loc}: {error['msg']}")
    return f"{source}: " + "; ".join(problems)


def parse_yaml_mapping(text: str, source: str, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TransplantError(f"{source}: not valid YAML: {problem}{where}") from None
    if data is None:
        raise TransplantError(f"{source}: the file is empty")
    if not isinstance(data, dict):
        raise TransplantError(f"{source}: {what} is a mapping of keys, got {type(data).__name__}")
    return data


def validate_recipe(data: Mapping[str, Any], source: str) -> TransplantOptions:
    """``data`` as TransplantOptions, with errors that name the key."""
    if "merge_method" in data:
        raise TransplantError(
            f"{source}: this is a mergekit merge configuration (it has 'merge_method'); "
            "run it with mergekit-omp-merge"
        )
    try:
        options = TransplantOptions.model_validate(dict(data))
    except ValidationError as exc:
        raise TransplantError(
            describe_validation_error(exc, source, candidates=RECIPE_KEYS + OVERRIDE_KEYS)
        ) from None
    return options


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read, validate and resolve a recipe file."""
    recipe_path = Path(path)
    source = str(path)
    try:
        text = recipe_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TransplantError(f"cannot read recipe {source}: {exc.strerror or exc}") from None
    written = validate_recipe(parse_yaml_mapping(text, source, "a recipe"), source)
    base_dir = recipe_path.parent
    resolved = written.model_copy(
        update={key: resolve_model_path(getattr(written, key), base_dir) for key in MODEL_KEYS}
    )
    return Recipe(path=recipe_path, options=resolved, written=written)


def recipe_dict(options: TransplantOptions) -> dict[str, Any]:
    """The shortest recipe for ``options``: keys that differ from the defaults, plus the models
    and method."""
    dumped = options.model_dump(mode="json", exclude_defaults=True)
    data = {key: getattr(options, key) for key in ALWAYS_WRITTEN}
    data.update(dumped)
    for key in ("prefix_match", "byte_match"):
        if key in data:
            scope = MatchScope(data[key])
            data[key] = {MatchScope.YES: True, MatchScope.NO: False}.get(scope, scope.value)
    return data


def recipe_yaml(options: TransplantOptions, header: str | None = None) -> str:
    """``options`` as recipe YAML text (``load_recipe`` of it gives ``options`` back)."""
    text = yaml.safe_dump(
        recipe_dict(options), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return f"{header.rstrip()}\n{text}" if header else text


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
    # transplant.py imports this module (for the model card's recipe), so import it here
    from mergekit_omp.transplant import transplant

    merge_options.apply_global_options()
    recipe = with_seed(load_recipe(recipe_file), merge_options.random_seed)
    result = transplant(
        recipe.options,
        out_path,
        merge_options=merge_options,
        overwrite=overwrite,
        report_path=report_path,
    )
    from mergekit_omp.cli import echo_summary

    echo_summary(result.report, out_path, merge_options)


@click.command("mergekit-omp-yaml", cls=PrettyPrintHelp)
@click.argument("recipe_file", type=str)
@click.argument("out_path", type=str)
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


run = one_shot_entry_point(main)
"""The ``mergekit-omp-yaml`` console script."""
