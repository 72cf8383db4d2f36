"""A mergekit merge configuration with mergekit-omp's additions, split into the part mergekit
validates and runs and the part mergekit-omp handles.

Two additions, both removed before mergekit sees the configuration:

* a per-token source ``{kind: omp, k: 32}`` under ``tokenizer.tokens``, replaced by mergekit's
  ``{kind: zero}`` (the zero row of a model that lacks the token is then overwritten);
* a top-level ``omp:`` section: ``missing_tokens: omp`` makes mergekit-omp the source of every
  token a model lacks, approximated by ``method`` (default ``auto``) with its ``parameters``,
  as in a transplant recipe; ``k`` is OMP's number of anchors (per-token ``omp`` sources, and
  ``method`` where it takes ``k``).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergekit.common import ModelPath, ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_omp.approximators import get_approximator
from mergekit_omp.approximators.omp import DEFAULT_K
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import HUB_ID_RE
from mergekit_omp.options import (
    MethodName,
    MethodParameters,
    describe_validation_error,
)
from mergekit_omp.paths import resolve_model_path
from mergekit_omp.recipe import parse_yaml_mapping

LOG = logging.getLogger(__name__)

OMP_SECTION = "omp"


class OmpTokenSource(BaseModel):
    """``tokens: {"<tok>": {source: {kind: omp, k: 32}}}``: the token's OMP approximation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["omp"]
    k: int | None = Field(None, gt=0, description="Anchors per row (default: omp.k)")
    model: ModelReference | None = Field(
        None,
        description="Model whose row is approximated (default: the base model if it has the "
        "token, else the first model in the merge that has it)",
    )


class OmpMergeSettings(BaseModel):
    """The top-level ``omp:`` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    missing_tokens: Literal["omp", "mergekit"] = Field(
        "mergekit",
        description="Source of every token a model lacks (tokens without a `tokens:` entry): "
        "'omp' for that model's own approximation (by `method`), 'mergekit' for mergekit's "
        "own rule",
    )
    method: MethodName = Field(
        "auto", description="Approximator of the tokens `missing_tokens` fills"
    )
    parameters: MethodParameters = Field(default_factory=dict, description="Method parameters")
    k: int | None = Field(
        None,
        gt=0,
        description=f"Anchors per OMP row (default {DEFAULT_K}): per-token omp sources, and "
        "`method` if it takes k",
    )

    @property
    def omp_k(self) -> int:
        """k of per-token omp sources that name none."""
        return self.k or DEFAULT_K

    def method_and_parameters(self) -> tuple[str, dict[str, Any]]:
        """The method of ``missing_tokens: omp`` and its parameters with defaults filled in:
        ``k`` where the method takes it (``parameters`` win), as ``-k`` on the command line."""
        method = get_approximator(self.method)
        knobs = {"k": self.k} if self.k and "k" in method.parameter_names() else {}
        return method.name, method.validate_parameters({**knobs, **self.parameters})


@dataclass(frozen=True)
class OmpMergeConfig:
    """A loaded configuration.

    ``merge`` is what mergekit runs (model paths resolved, OMP sources replaced); ``written``
    is the same configuration with the paths as the file states them.
    """

    text: str
    merge: MergeConfiguration
    written: MergeConfiguration
    settings: OmpMergeSettings = OmpMergeSettings()
    token_sources: dict[str, OmpTokenSource] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    """Each model of the merge: the path as written -> the path as resolved."""

    @property
    def uses_omp(self) -> bool:
        return self.settings.missing_tokens == "omp" or bool(self.token_sources)


def _validated(model: type[BaseModel], data: Any, source: str, prefix: tuple[str, ...]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message = describe_validation_error(
            exc, source, prefix=prefix, candidates=tuple(model.model_fields)
        )
        raise TransplantError(message) from None


def split_omp_keys(
    data: dict[str, Any], source: str
) -> tuple[dict[str, Any], OmpMergeSettings, dict[str, OmpTokenSource]]:
    """(mergekit's part of ``data``, the ``omp:`` settings, the per-token OMP sources)."""
    data = copy.deepcopy(data)
    settings = _validated(
        OmpMergeSettings, data.pop(OMP_SECTION, None) or {}, source, (OMP_SECTION,)
    )
    tokenizer = data.get("tokenizer")
    tokens = tokenizer.get("tokens") if isinstance(tokenizer, dict) else None
    token_sources: dict[str, OmpTokenSource] = {}
    for token, entry in (tokens or {}).items():
        token_source = entry.get("source") if isinstance(entry, dict) else None
        if not (isinstance(token_source, dict) and token_source.get("kind") == "omp"):
            continue
        where = ("tokenizer", "tokens", token)
        if entry.get("force"):
            raise TransplantError(
                f"{source}: {'.'.join(where)}.force: does not apply to an omp source (a model "
                "that has the token keeps its own row)"
            )
        token_sources[token] = _validated(OmpTokenSource, token_source, source, (*where, "source"))
        entry["source"] = {"kind": "zero"}
    return data, settings, token_sources


def _map_model_references(value: Any, resolve: Any) -> Any:
    """``value`` with every ModelReference inside it replaced by ``resolve(reference)``."""
    if isinstance(value, ModelReference):
        return resolve(value)
    if isinstance(value, BaseModel):
        updates = {
            name: _map_model_references(getattr(value, name), resolve)
            for name in type(value).model_fields
        }
        return value.model_copy(update=updates)
    if isinstance(value, list):
        return [_map_model_references(item, resolve) for item in value]
    if isinstance(value, tuple):
        return tuple(_map_model_references(item, resolve) for item in value)
    if isinstance(value, dict):
        return {key: _map_model_references(item, resolve) for key, item in value.items()}
    return value


def reference_resolver(base_dir: Path) -> Any:
    def resolve(reference: ModelReference) -> ModelReference:
        def moved(path: ModelPath | None) -> ModelPath | None:
            if path is None:
                return None
            return ModelPath(path=resolve_model_path(path.path, base_dir), revision=path.revision)

        return reference.model_copy(
            update={"model": moved(reference.model), "lora": moved(reference.lora)}
        )

    return resolve


def _warn_unknown_keys(data: dict[str, Any], source: str) -> None:
    for key in data:
        if key not in MergeConfiguration.model_fields:
            LOG.warning("%s: mergekit ignores the unknown key '%s'", source, key)


def merge_configuration(data: dict[str, Any], source: str) -> MergeConfiguration:
    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as exc:
        raise TransplantError(
            describe_validation_error(
                exc, source, candidates=tuple(MergeConfiguration.model_fields)
            )
        ) from None
    except RuntimeError as exc:  # mergekit's validators raise RuntimeError
        raise TransplantError(f"{source}: {exc}") from None


def check_dtypes(merge: MergeConfiguration, source: str) -> None:
    """``dtype``/``out_dtype`` name a dtype mergekit knows; mergekit itself refuses a bad one
    only once the merge is running (``RuntimeError: Unimplemented dtype``)."""
    for key in ("dtype", "out_dtype"):
        name = getattr(merge, key)
        try:
            dtype_from_name(name)
        except RuntimeError:
            raise TransplantError(
                f"{source}: {key}: {name!r} is not a dtype mergekit merges in (known: "
                "bfloat16, float16, float32, float64, int64)"
            ) from None


def _is_hub_id(path: str, base_dir: Path) -> bool:
    """``owner/name`` whose ``owner`` is no local folder (beside the config or here)."""
    if not HUB_ID_RE.match(path) or path.startswith("."):
        return False
    owner = path.split("/", 1)[0]
    return not ((base_dir / owner).is_dir() or os.path.isdir(owner))


def check_local_models(written: MergeConfiguration, base_dir: Path, source: str) -> None:
    """A model path that is no hub id must exist, or mergekit reports it as a hub error."""
    for reference in written.referenced_models():
        for path in (reference.model, reference.lora):
            if path is None or _is_hub_id(path.path, base_dir):
                continue
            if not os.path.exists(resolve_model_path(path.path, base_dir)):
                raise TransplantError(
                    f"{source}: model {path.path} does not exist (looked beside {source} and "
                    "in the current directory)"
                )


def input_models(merge: MergeConfiguration) -> set[ModelReference]:
    """The models whose weights the merge reads (not a tokenizer-only source)."""
    models = {m.model for m in merge.models or []}
    for piece in merge.slices or []:
        models.update(s.model for s in piece.sources)
    if merge.base_model is not None:
        models.add(merge.base_model)
    return models


def check_tokenizer_source_is_merged(config: OmpMergeConfig, source: str) -> None:
    """A tokenizer taken from a model that is not merged (``passthrough`` of BASE with
    ``tokenizer: {source: DONOR}``) is a transplant: OMP here fills a token from a merged
    model that has it, so DONOR's new tokens would get zero rows. Refuse it in one line."""
    merge = config.merge
    tokenizer_source = merge.tokenizer.source if merge.tokenizer else merge.tokenizer_source
    if not (config.uses_omp and isinstance(tokenizer_source, ModelReference)):
        return
    if tokenizer_source in input_models(merge):
        return
    bases = sorted(str(m) for m in input_models(merge))
    base = bases[0] if len(bases) == 1 else "BASE"
    raise TransplantError(
        f"{source}: tokenizer.source {tokenizer_source} is not merged, so its new tokens have no "
        f"row to fill: to give {base} its tokenizer run `mergekit-omp {base} "
        f"{tokenizer_source} OUT` (or a transplant recipe with mergekit-omp-yaml)"
    )


def check_omp_use(config: OmpMergeConfig, source: str) -> None:
    merge = config.merge
    if config.uses_omp and merge.tokenizer is None and merge.tokenizer_source is None:
        raise TransplantError(
            f"{source}: OMP token rows need a merged vocabulary: add `tokenizer: {{source: "
            "union}` (or a model as source); without one no model lacks a token"
        )
    check_tokenizer_source_is_merged(config, source)
    referenced = set(merge.referenced_models())
    for token, token_source in config.token_sources.items():
        if token_source.model is not None and token_source.model not in referenced:
            raise TransplantError(
                f"{source}: tokenizer.tokens.{token}.source.model: {token_source.model} is not "
                "a model of this merge"
            )


def warn_unused_settings(config: OmpMergeConfig, source: str) -> None:
    """``omp:`` keys that change nothing in this configuration (a warning, as ``-k`` for a
    method without k on the command line)."""
    settings = config.settings
    chosen = settings.model_fields_set & {"method", "parameters"}
    if chosen and settings.missing_tokens != "omp":
        LOG.warning(
            "%s: omp.%s: applies to `missing_tokens: omp` only; ignored", source, sorted(chosen)[0]
        )
    takes_k = "k" in get_approximator(settings.method).parameter_names()
    if settings.k and not takes_k and not config.token_sources:
        LOG.warning(
            "%s: omp.k: method '%s' takes no k and no token has an omp source; ignored",
            source,
            settings.method,
        )


def parse_merge_config(text: str, source: str, base_dir: Path) -> OmpMergeConfig:
    """Validate a merge configuration with mergekit-omp's additions; see the module docstring."""
    raw = parse_yaml_mapping(text, source, "a merge configuration")
    data, settings, token_sources = split_omp_keys(raw, source)
    _warn_unknown_keys(data, source)
    written = merge_configuration(data, source)
    check_dtypes(written, source)
    check_local_models(written, base_dir, source)
    resolve = reference_resolver(base_dir)
    config = OmpMergeConfig(
        text=text,
        merge=_map_model_references(written, resolve),
        written=written,
        settings=settings,
        token_sources={
            token: _map_model_references(token_source, resolve)
            for token, token_source in token_sources.items()
        },
        models={
            str(ref): str(resolve(ref)) for ref in sorted(written.referenced_models(), key=str)
        },
    )
    check_omp_use(config, source)
    warn_unused_settings(config, source)
    return config


def load_merge_config(path: str | Path) -> OmpMergeConfig:
    """Read a merge configuration; relative model paths are read beside it first."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TransplantError(f"cannot read {source}: {exc.strerror or exc}") from None
    return parse_merge_config(text, source, Path(path).parent)
