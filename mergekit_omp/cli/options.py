"""The options the commands share, defined once so that a name means one thing everywhere.

* ``-a NAME[:PARAM=VALUE,...]``: a method, with its parameters if wanted (``-a omp:k=8``
  and ``-a omp -k 8`` mean the same).
* ``-k``, ``-c``, ``-w``, ``-s``: mergekit-tokensurgeon's method knobs, passed to a method
  that takes ``k``, ``cosine_similarity``, ``weight_scheme``, ``subword_method``; their
  help states each method's own default.
* ``-bm``, ``-pm``: ``no``/``yes``/``embed``/``lm_head``, the matrices a matching rule
  applies to.
* ``--bos``: the output tokenizer's BOS insertion (``keep_donor``/``match_base``).
* ``--report PATH``: the JSON report; ``output_file_option`` for any file a command writes,
  ``out_path_argument`` and ``--overwrite`` for the directory it publishes.
* ``transplant_options``: every transplant flag (``mergekit-omp`` and ``mergekit-omp-report``),
  and ``transplant_options_from_cli``, the ``TransplantOptions`` they build.
* mergekit's own options, only those a command uses (``merge_options(*READ_OPTIONS)``).

Defaults and choices are read from ``TransplantOptions`` and the method registry, as
mergekit's ``add_merge_options`` reads ``MergeOptions``, so no default is written twice.
"""

from __future__ import annotations

import enum
import functools
import logging
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

import click
import yaml
from mergekit.common import parse_kmb
from mergekit.options import OPTION_HELP, MergeOptions
from mergekit.tokensurgeon import SubwordMethod, WeightingScheme
from pydantic import ValidationError

from mergekit_omp.approximators import approximator_names, get_approximator, split_method_spec
from mergekit_omp.approximators.base import MAX_BATCH_SIZE
from mergekit_omp.errors import TransplantError, UsageValueError
from mergekit_omp.options import MatchScope, TransplantOptions, describe_validation_error

LOG = logging.getLogger("mergekit_omp")
READ_OPTIONS = (
    "trust_remote_code",
    "lazy_unpickle",
    "transformers_cache",
    "cuda",
    "device",
    "num_threads",
    "random_seed",
    "verbosity",
    "quiet",
)
"""mergekit options of every command that reads models."""
WRITE_OPTIONS = (
    "out_shard_size",
    "safe_serialization",
    "clone_tensors",
    "async_write",
    "write_threads",
    "write_model_card",
)
"""mergekit options of the commands that write a model."""
SUMMARY_HELP = {
    "quiet": "No progress bars and no summary (warnings are still printed)",
    "verbosity": "The full audit in the summary, and more logging (repeat for debug)",
}
"""Help of the options that shape the end-of-run summary (mergekit-omp, -yaml)."""
METHOD_KNOBS = {
    "k": "-k",
    "cosine_similarity": "-c/--cosine-similarity",
    "weight_scheme": "-w/--weight-scheme",
    "subword_method": "-s/--subword-method",
}
"""mergekit-tokensurgeon flags that are parameters of some methods."""
LENIENT_KNOBS = ("k",)
"""Knobs ignored (with a warning) by a method that does not take them: mergekit-tokensurgeon
scripts pass ``-k`` to every method. The others are refused where no method uses them."""


OPTION_FIELDS = TransplantOptions.model_fields


class ShardSize(click.ParamType):
    """mergekit's ``--out-shard-size`` (bytes, or a number with K, M or B for thousand,
    million, billion), refused in one line unless it is a positive size."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            size = parse_kmb(value)
        except (ValueError, IndexError, OverflowError, AttributeError):
            size = 0
        if isinstance(size, int) and size >= 1:
            return size
        self.fail(
            f"{value!r} is not a shard size: give a whole number of bytes of at least 1, "
            "optionally with K, M or B (thousand, million, billion), e.g. 5B"
        )


class BatchSize(click.ParamType):
    """``--batch-size``: tokens per batch, from 1 to ``MAX_BATCH_SIZE``, or -1 for one batch."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            size = int(value)
        except (TypeError, ValueError):
            size = 0
        if size == -1 or 1 <= size <= MAX_BATCH_SIZE:
            return size
        self.fail(
            f"{value!r} is not a batch size: give a whole number of tokens from 1 to "
            f"{MAX_BATCH_SIZE}, or -1 for one batch"
        )


STRICT_MERGE_TYPES: dict[str, click.ParamType] = {
    "out_shard_size": ShardSize(),
    "write_threads": click.IntRange(min=1),
}
"""mergekit options whose values mergekit takes unchecked (a traceback, or a size of 0)."""


def strict_merge_types(f: Callable[..., Any]) -> Callable[..., Any]:
    """The checked types of ``STRICT_MERGE_TYPES`` on options mergekit's own
    ``add_merge_options`` declared (``mergekit-omp-merge`` takes all of them)."""
    for param in getattr(f, "__click_params__", []):
        if param.name in STRICT_MERGE_TYPES:
            param.type = STRICT_MERGE_TYPES[param.name]
    return f


def option_default(name: str) -> Any:
    """The default of a ``TransplantOptions`` field, as click shows and passes it."""
    default = OPTION_FIELDS[name].default
    return default.value if isinstance(default, enum.Enum) else default


def option_choices(name: str) -> list[str]:
    """The values an enum or ``Literal`` field of ``TransplantOptions`` allows (``None``
    aside)."""
    annotation = OPTION_FIELDS[name].annotation
    for kind in (annotation, *get_args(annotation)):
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return [member.value for member in kind]
        if get_origin(kind) is Literal:
            return list(get_args(kind))
    raise TypeError(f"TransplantOptions.{name} is not an enum or a Literal")


def merge_options(
    *fields: str, help_overrides: dict[str, str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """mergekit's ``add_merge_options`` limited to ``fields``: each command's ``--help``
    lists only the mergekit options it uses. The command receives ``merge_options``."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in fields if name in kwargs}
            kwargs["merge_options"] = MergeOptions(**values)
            return function(*args, **kwargs)

        command: Callable[..., Any] = wrapper
        for name in reversed(fields):
            command = merge_option(name, (help_overrides or {}).get(name))(command)
        return command

    return decorate


def merge_option(
    name: str, help_text: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One MergeOptions field as mergekit's ``add_merge_options`` declares it."""
    info = MergeOptions.model_fields[name]
    field_type: Any = info.annotation
    if typing.get_origin(field_type) is Union:
        field_type = next(t for t in typing.get_args(field_type) if t is not type(None))
    if name in STRICT_MERGE_TYPES:
        field_type = STRICT_MERGE_TYPES[name]
    if name == "random_seed":  # mergekit passes it to numpy, which takes 0 .. 2**32 - 1
        field_type = click.IntRange(0, 2**32 - 1)
    flag = name.replace("_", "-")
    declarations = [f"--{flag}/--no-{flag}" if field_type is bool else f"--{flag}"]
    extra: dict[str, Any] = {}
    if name == "verbosity":
        declarations, extra = ["-v", "verbosity"], {"count": True}
    if name == "num_threads":
        declarations = ["--num-threads", "-j"]
    return click.option(
        *declarations,
        type=field_type,
        default=info.default,
        help=help_text or OPTION_HELP.get(name),
        show_default=name not in ("out_shard_size", "verbosity"),
        **extra,
    )


def refuse_empty_path(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A click callback for output paths: an empty one (``"$OUT"`` with ``OUT`` unset) would
    mean the current directory, so it is a usage error."""
    if value == "":
        raise click.BadParameter("the path is empty (an unset variable?): give a path")
    return value


def out_path_argument(f: Callable[..., Any]) -> Callable[..., Any]:
    """``OUT_PATH``, the directory a command publishes its model to."""
    return click.argument("out_path", type=str, callback=refuse_empty_path)(f)


def output_file_option(*declarations: str, help_text: str, hidden: bool = False) -> Any:
    """An option naming a file a command writes (``--report``, ``--plot``)."""
    return click.option(
        *declarations,
        type=click.Path(dir_okay=False),
        default=None,
        callback=refuse_empty_path,
        hidden=hidden,
        help=help_text,
    )


overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Replace OUT_PATH if it exists and is not empty (never an input, nor a folder "
    "holding one).",
)

report_option = output_file_option(
    "--report",
    "report_path",
    help_text="Also write the JSON report (match counts, method, seconds) to this path.",
)


METHOD_METAVAR = "NAME[:PARAM=VALUE,...]"


def knob_defaults(parameter: str) -> str:
    """Each method's own default of ``parameter``: 'omp 64, wechsel 10, ...'."""
    seen, parts = set(), []
    for name in approximator_names():
        method = get_approximator(name)
        field = method.parameters.model_fields.get(parameter)
        if field is None or method.name in seen:
            continue
        seen.add(method.name)
        default = "all" if field.default is None and parameter == "k" else field.default
        parts.append(f"{method.name} {default}")
    return ", ".join(parts)


def knob_values(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The knobs given on the command line (a knob's default is each method's own)."""
    return {name: values[name] for name in METHOD_KNOBS if values.get(name) is not None}


def parameters_for(method: str, knobs: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """The knobs ``method`` takes, then each layer (``-a NAME:...``, ``-p``), later winning.

    A knob the method does not take is refused, except ``-k`` (ignored with a warning,
    as every mergekit-tokensurgeon script passes it): the one home of that rule."""
    accepted = set(get_approximator(method).parameter_names())
    parameters = {}
    for name, value in knobs.items():
        if name in accepted:
            parameters[name] = value
        elif name in LENIENT_KNOBS:
            LOG.warning("Method '%s' takes no %s; %s ignored", method, name, METHOD_KNOBS[name])
        else:
            users = sorted(
                {
                    get_approximator(m).name
                    for m in approximator_names()
                    if name in get_approximator(m).parameter_names()
                }
            )
            raise TransplantError(
                f"{METHOD_KNOBS[name]}: method '{method}' takes no {name} (methods that do: "
                f"{', '.join(users) or 'none installed'})"
            )
    for layer in layers:
        parameters.update(layer)
    return parameters


def method_knob_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``-k``, ``-c/-nc``, ``-w``, ``-s``: named as in mergekit-tokensurgeon, defaults per method."""
    decorators = [
        click.option(
            "--k",
            "-k",
            type=int,
            default=None,
            help=f"Anchors per new token, for methods that take k [default: each method's own: "
            f"{knob_defaults('k')}].",
        ),
        click.option(
            "--cosine-similarity/--no-cosine-similarity",
            "-c/-nc",
            default=None,
            help="Nearest anchors by cosine similarity instead of Euclidean distance, for "
            f"methods that take it [default: {knob_defaults('cosine_similarity')}].",
        ),
        click.option(
            "--weight-scheme",
            "-w",
            type=click.Choice([w.value for w in WeightingScheme]),
            default=None,
            help="How the nearest anchors are weighted, for methods that take it "
            f"[default: {knob_defaults('weight_scheme')}].",
        ),
        click.option(
            "--subword-method",
            "-s",
            type=click.Choice([m.value for m in SubwordMethod]),
            default=None,
            help="How a new token's pieces are pooled, for methods that take it "
            f"[default: {knob_defaults('subword_method')}].",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def choice_option(
    *flags: str, field: str, help_text: str, show_default: bool = True
) -> Callable[..., Any]:
    """An option taking the values a ``TransplantOptions`` field allows, with its default."""
    return click.option(
        *flags,
        type=click.Choice(option_choices(field)),
        default=option_default(field),
        show_default=show_default,
        help=help_text,
    )


def scope_option(name: str, short: str, help_text: str) -> Callable[..., Any]:
    return choice_option(
        f"--{name}",
        short,
        field=name.replace("-", "_"),
        help_text=help_text + " (embed, lm_head, yes = both, no).",
    )


byte_match_option = scope_option(
    "byte-match",
    "-bm",
    "Match single-byte tokens across encodings (<0x0A> with a byte-level newline) in the "
    "named matrices",
)
prefix_match_option = scope_option(
    "prefix-match",
    "-pm",
    "Give a new token the row of its longest base-vocabulary prefix in the named matrices",
)

bos_option = choice_option(
    "--bos",
    field="bos",
    help_text="The output tokenizer's BOS insertion. keep_donor: the donor's, unchanged (a draft "
    "for the donor's models, in llama.cpp too); match_base: insert a BOS token exactly when "
    "the base's tokenizer does (its BOS row on the donor's BOS token), for the model on its "
    "own.",
)


def json_report_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--report PATH`` for the JSON report (``--json PATH``, hidden, still works)."""
    f = output_file_option("--json", "json_path", help_text="", hidden=True)(f)
    return output_file_option(
        "--report", "report_path", help_text="Also write the JSON report to this path."
    )(f)


def report_path_of(report_path: str | None, json_path: str | None) -> str | None:
    if report_path and json_path and report_path != json_path:
        raise TransplantError("--report and --json name the same report: give one")
    return report_path or json_path


def report_flag(report_path: str | None, json_path: str | None) -> str:
    """The flag the user gave the report path with, for error messages."""
    return "--json" if json_path and not report_path else "--report"


def parse_param(values: tuple[str, ...]) -> dict[str, Any]:
    params = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got '{item}'", param_hint="--param")
        params[key.strip()] = yaml.safe_load(raw)
    return params


def method_parameters(
    method: str, knobs: dict[str, Any], explicit: dict[str, Any], spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Knob flags the method takes, then ``-a NAME:PARAM=VALUE`` and ``--param`` (which win)."""
    return parameters_for(method, knobs, spec or {}, explicit)


def transplant_options_from_cli(
    ctx: click.Context, base: str, donor: str, values: dict[str, Any], merge_options: MergeOptions
) -> TransplantOptions:
    method, spec = split_method_spec(values["approximation_method"])
    try:
        return _options(ctx, base, donor, method, spec, values, merge_options)
    except ValidationError as exc:  # a value of the command line: exit 2
        raise UsageValueError(describe_validation_error(exc)) from None


def _options(
    ctx: click.Context,
    base: str,
    donor: str,
    method: str,
    spec: dict[str, Any],
    values: dict[str, Any],
    merge_options: MergeOptions,
) -> TransplantOptions:
    return TransplantOptions(
        base_model=base,
        donor=donor,
        method=method,
        parameters=method_parameters(
            method, knob_values(ctx, values), parse_param(values["param"]), spec
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


def transplant_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The method and matching flags, named as in mergekit-tokensurgeon."""
    decorators: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--approximation-method",
            "-a",
            metavar=METHOD_METAVAR,
            default=option_default("method"),
            show_default=True,
            help="Method for the rows of donor tokens the base lacks, with parameters if "
            "wanted (-a omp:k=8 is -a omp -k 8): " + ", ".join(approximator_names()) + ".",
        ),
        method_knob_options,
        click.option(
            "--batch-size",
            type=BatchSize(),
            default=option_default("batch_size"),
            show_default=True,
            help="Tokens approximated per batch. -1 for one batch. For omp an upper bound: "
            "it sizes its chunks from its memory budget (-p memory_gb=GB).",
        ),
        prefix_match_option,
        byte_match_option,
        click.option(
            "--magikarp/--no-magikarp",
            default=option_default("magikarp"),
            show_default=True,
            help="Ignore under-trained tokens when matching (arXiv 2405.05417).",
        ),
        click.option(
            "--new-vocab-noise",
            "-nvn",
            type=click.FloatRange(min=0),
            default=option_default("new_vocab_noise"),
            help="Add Gaussian noise of this std to approximated rows.",
        ),
        click.option(
            "--new-vocab-scale",
            "-nvs",
            type=float,
            default=option_default("new_vocab_scale"),
            help="Scale approximated rows by this factor.",
        ),
        click.option(
            "--param",
            "-p",
            multiple=True,
            metavar="NAME=VALUE",
            help="A method parameter (repeatable), e.g. -p k=32; wins over -a NAME:... and "
            "-k/-c/-w/-s.",
        ),
        click.option(
            "--pad-vocab-to-multiple-of",
            type=click.IntRange(min=1),
            default=option_default("pad_vocab_to_multiple_of"),
            help="Pad the new vocabulary with zero rows to a multiple of N (64, 128).",
        ),
        bos_option,
        choice_option(
            "--dtype",
            field="dtype",
            help_text="Dtype of the new matrices (default: the base model's).",
            show_default=False,
        ),
        choice_option(
            "--guard",
            field="guard",
            help_text="What to do with approximated rows the audit flags as outliers "
            "(breaker tokens, arXiv 2601.00065): clip them to the base norm bound, "
            "shrink their coefficients (ridge), or leave them; the audit always "
            "runs and warns (docs/diagnostics.md).",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f
