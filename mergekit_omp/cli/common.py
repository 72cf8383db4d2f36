"""What every mergekit-omp command shares: error handling and the output options."""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from mergekit.options import MergeOptions

from mergekit_omp.errors import TransplantError


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_cli_action(action: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into one line on stderr and a non-zero exit; SIGTERM acts as Ctrl-C."""

    @functools.wraps(action)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        merge_options: MergeOptions | None = kwargs.get("merge_options")
        verbose = merge_options is not None and merge_options.verbosity > 0
        try:
            return action(*args, **kwargs)
        except TransplantError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted: no output was written.", err=True)
            sys.exit(130)
        except Exception as exc:
            if verbose:
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(
                f"Error: {type(exc).__name__}: {message} (run with -v for details)", err=True
            )
            sys.exit(1)

    return wrapper


def one_shot_entry_point(command: click.Command) -> Callable[[], NoReturn]:
    """A console-script entry point for a command that is the whole life of its process.

    * Python's cyclic garbage collector is off while ``command`` runs: its full collections
      walk the millions of objects of the imported modules, the tokenizers and the
      vocabularies again and again (about 2 s of a 30 s Gemma-3 <- SmolLM2 transplant; the
      peak memory is the same without them).
    * The process then leaves without the interpreter's teardown: freeing those objects
      would take another 1.6 to 2 s once everything that matters is on disk. Standard streams
      and logging are flushed first.
    """

    def entry() -> NoReturn:
        gc.disable()
        try:
            command.main()  # standalone: always ends in SystemExit
            code: Any = 0
        except SystemExit as done:
            code = done.code
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


overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Replace OUT_PATH if it exists and is not empty.",
)

report_option = click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the JSON report (match counts, method, seconds) to this path.",
)
