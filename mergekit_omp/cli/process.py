"""Entry and process plumbing of the console scripts: the error and exit contract, the
one-shot entry points, the process tuning.

The promise each command keeps (docs/cli.md): a bad input gets one line on stderr naming what
is wrong and a non-zero exit before any heavy work; inputs are never modified; OUT is either
the complete new model or exactly what it was before, and the message says which
(``run_cli_action``; usage errors: ``command_class``). Exit codes: 0 done (or interrupted
after publishing), 1 an error, 2 a usage error, 130 interrupted before publishing.

The console scripts (``[project.scripts]``) are this module's entry points, so it imports no
heavy library (torch, transformers, mergekit) at module level: Ctrl-C during those imports is
one line too.
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from mergekit_omp import publish
from mergekit_omp.errors import TransplantError, UsageValueError, one_line

if TYPE_CHECKING:
    from mergekit.options import MergeOptions


USAGE_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130
USAGE_EXIT = 2
"""A value of the command line out of range (click's usage errors, ``UsageValueError``)."""
_process = {"one_shot": False}


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def output_state(out_path: str | None) -> str:
    """What OUT holds now, as the end of a message."""
    if out_path is None:
        return "nothing was written"
    if publish.published_outputs():
        return f"{out_path} holds the complete new model"
    return f"{out_path} was left as it was"


def _fail(message: str, out_path: str | None, status: int = 1) -> NoReturn:
    state = f"; {output_state(out_path)}" if out_path is not None else ""
    click.echo(f"Error: {message}{state}", err=True)
    sys.exit(status)


def _interrupted(out_path: str | None) -> NoReturn:
    if publish.published_outputs():
        click.echo(f"Interrupted after publishing: {output_state(out_path)}.", err=True)
        sys.exit(0)
    click.echo(f"Interrupted: {output_state(out_path)}.", err=True)
    sys.exit(INTERRUPTED_EXIT)


def run_cli_action(action: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into one line on stderr that says what OUT holds, and an exit status:
    1 for an error, 130 for Ctrl-C or SIGTERM before OUT was published, 0 once it was."""

    @functools.wraps(action)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        publish.forget_published()
        merge_options: MergeOptions | None = kwargs.get("merge_options")
        verbose = merge_options is not None and merge_options.verbosity > 0
        out_path: str | None = kwargs.get("out_path")
        try:
            with publish.signals_held_once_published():
                result = action(*args, **kwargs)
        except click.ClickException:
            raise
        except UsageValueError as exc:
            _fail(one_line(str(exc)), out_path, USAGE_EXIT)
        except TransplantError as exc:
            _fail(one_line(str(exc)), out_path)
        except KeyboardInterrupt:
            _interrupted(out_path)
        except Exception as exc:
            if verbose:
                raise
            message = one_line(str(exc))
            _fail(f"{type(exc).__name__}: {message} (run with -v for details)", out_path)
        if _process["one_shot"]:  # done: the process only flushes and leaves now
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        return result

    return wrapper


class OneLineErrors(click.Command):
    """click's usage errors as one line on stderr ("Error: ... (see CMD --help)"), exit 2,
    instead of the usage, a hint and the error over four lines."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            name = prog_name or self.name
            click.echo(f"Error: {one_line(exc.format_message())} (see {name} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C while click parsed the command line
            click.echo("Interrupted: nothing was written.", err=True)
            sys.exit(INTERRUPTED_EXIT)
        sys.exit(code if isinstance(code, int) else 0)


@functools.cache
def command_class() -> type[click.Command]:
    """mergekit's help layout (``PrettyPrintHelp``) with one-line usage errors."""
    from mergekit.options import PrettyPrintHelp

    class OmpCommand(OneLineErrors, PrettyPrintHelp):
        pass

    return OmpCommand


def one_shot_entry_point(
    command: click.Command | str, *, collect_garbage: bool = False
) -> Callable[[], NoReturn]:
    """A console-script entry point for a command that is the whole life of its process.

    ``command`` may be ``"module:attribute"``, imported when the script runs, so that Ctrl-C
    during the seconds of importing torch, transformers and mergekit ends in one line
    (exit 130) rather than a traceback.

    * Unless ``collect_garbage``, Python's cyclic garbage collector is off while the command
      runs: its full collections walk the millions of objects of the imported modules, the
      tokenizers and the vocabularies again and again (about 2 s of a 30 s Gemma-3 <-
      SmolLM2 transplant; the peak memory is the same without them).
    * The process then leaves without the interpreter's teardown: freeing those objects
      would take another 1.6 to 2 s once everything that matters is on disk. Standard streams
      and logging are flushed first.
    * Before anything heavy is imported, ``prepare_process`` sets what the whole process
      gains from.
    """

    def entry() -> NoReturn:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # imports take seconds
        _process["one_shot"] = True
        prepare_process()
        if not collect_garbage:
            gc.disable()
        try:
            loaded = _load_command(command)
            loaded.main()  # standalone: always ends in SystemExit
            code: Any = 0
        except SystemExit as done:
            code = done.code
        except KeyboardInterrupt:  # while importing, before any command ran
            click.echo("Interrupted: nothing was written.", err=True)
            code = INTERRUPTED_EXIT
        if code is None:
            code = 0
        elif not isinstance(code, int):  # as sys.exit does with a message
            click.echo(code, err=True)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)

    return entry


THP_ENV = "THP_MEM_ALLOC_ENABLE"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def prepare_process() -> None:
    """Settings for a command that is the whole life of its process, made before torch is
    imported: torch's own switch ``THP_MEM_ALLOC_ENABLE``, unless the user set it or the kernel
    has no transparent huge pages to give, puts tensors of 2 MB and more on huge pages.

    A transplant allocates gigabytes of short-lived tensors (anchor gathers, screening
    scores, the assembled matrix), each fresh from the kernel. On 4 KB pages the large-model
    benchmark took 1.5 million page faults and 13 s of system time, on huge pages 0.5 million
    and 9.6 s (AMD EPYC VM, same run)."""
    if THP_ENV not in os.environ and huge_pages_available():
        os.environ[THP_ENV] = "1"


def huge_pages_available() -> bool:
    try:
        with open(THP_SETTING, encoding="ascii") as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


def _load_command(command: click.Command | str) -> click.Command:
    if isinstance(command, click.Command):
        return command
    module, _, attribute = command.partition(":")
    return getattr(importlib.import_module(module), attribute)


mergekit_omp = one_shot_entry_point("mergekit_omp.cli.transplant:main")
mergekit_omp_yaml = one_shot_entry_point("mergekit_omp.cli.recipe:main")
mergekit_omp_merge = one_shot_entry_point("mergekit_omp.cli.merge:main", collect_garbage=True)
mergekit_omp_eval = one_shot_entry_point("mergekit_omp.cli.evaluate:main", collect_garbage=True)
mergekit_omp_report = one_shot_entry_point("mergekit_omp.cli.report:main", collect_garbage=True)
mergekit_omp_check = one_shot_entry_point("mergekit_omp.cli.check:main", collect_garbage=True)
