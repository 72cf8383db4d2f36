"""Recipes: the YAML form of :class:`~mergekit_omp.options.TransplantOptions`, read and
written here (``mergekit-omp-yaml``, ``mergekit-omp --print-recipe``, the model card)::

    base_model: HuggingFaceTB/SmolLM2-135M
    donor: ./my-donor            # relative paths are read from the recipe's directory
    method: omp
    parameters: {k: 64}
    lm_head: {method: mean}
    byte_match: yes

A recipe validates through the same model the command line builds, so the two mean exactly
the same thing. ``parse_yaml_mapping`` is also how merge configurations are read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergekit_omp.errors import TransplantError
from mergekit_omp.options import (
    MatchScope,
    MatrixOverride,
    TransplantOptions,
    describe_validation_error,
)
from mergekit_omp.paths import resolve_model_path

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
