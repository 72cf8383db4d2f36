"""Publish stage: an output directory appears complete or not at all, and never over an input.

Every command that writes a model writes it into a hidden staging directory beside OUT
(``.OUT.partial-*``) and publishes it with one rename at the end:

* OUT absent (or an empty directory): a rename that cannot replace anything
  (``renameat2(RENAME_NOREPLACE)``), so a model another run published meanwhile is never
  replaced without ``--overwrite``;
* OUT replaced (``--overwrite``): ``renameat2(RENAME_EXCHANGE)`` swaps the two directories
  in one step, then the old one is removed. Where the kernel or filesystem lacks
  ``renameat2`` it takes two renames with SIGINT/SIGTERM held and the old OUT put back if
  the second fails.

SIGINT and SIGTERM are held while publishing and delivered once the outcome is settled, so
an interruption leaves OUT either the complete new model or exactly what it was before, and
:func:`published_outputs` says which. The staging directory is removed on every error.

Before any work, :func:`check_output_path` and :func:`check_output_file` refuse an output
that is, contains or lies inside an input (symbolic links resolved), even with
``--overwrite``, and any path that could not be published (a file, a symbolic link, a
folder that does not exist or cannot be written).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mergekit_omp.errors import TransplantError

LOG = logging.getLogger(__name__)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_published: list[Path] = []
_held_until: list[contextlib.ExitStack] = []


def published_outputs() -> tuple[Path, ...]:
    """The output directories this process published since :func:`forget_published`."""
    return tuple(_published)


def forget_published() -> None:
    _published.clear()


class RenameUnsupported(OSError):
    """``renameat2`` or the flag asked for is not available here."""


def _load_renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def renameat2(source: Path, target: Path, flags: int) -> None:
    """Linux's ``renameat2``; :class:`RenameUnsupported` where it or ``flags`` is missing."""
    if _RENAMEAT2 is None:
        raise RenameUnsupported(errno.ENOSYS, "renameat2 is not available")
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        raise RenameUnsupported(code, os.strerror(code), str(source), None, str(target))
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` only if nothing is there (an empty directory may be).

    Without ``renameat2``: plain ``rename``, which replaces a directory only when it is
    empty and fails on a file or a non-empty directory, the same outcome for publishing.
    """
    if os.path.isdir(target) and not os.path.islink(target):
        os.rename(source, target)  # an empty directory is replaced; a filled one refused
        return
    try:
        renameat2(source, target, RENAME_NOREPLACE)
    except RenameUnsupported:
        os.rename(source, target)


def rename_exchange(source: Path, target: Path) -> None:
    """Swap ``source`` and ``target`` in one step (both must exist)."""
    renameat2(source, target, RENAME_EXCHANGE)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM are recorded, not acted on, until the block ends; then the first
    one received is delivered to the handler in place before the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in _HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])


@contextlib.contextmanager
def signals_held_once_published() -> Iterator[None]:
    """Once an output is published inside this block, SIGINT and SIGTERM wait for the end of
    the block (the rest of the command: its report file and summary) instead of the end of
    the rename."""
    with contextlib.ExitStack() as stack:
        _held_until.append(stack)
        try:
            yield
        finally:
            _held_until.pop()


def _display(path: str | os.PathLike) -> str:
    return os.fspath(path)


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _local_inputs(inputs: Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(as given, resolved) for each input that exists on this machine (hub ids do not)."""
    found = []
    for given in inputs:
        expanded = os.path.expanduser(os.fspath(given))
        if os.path.exists(expanded):
            found.append((_display(given), _resolved(expanded)))
    return found


def refuse_inputs(
    out: Path, shown: str, inputs: Iterable[str | os.PathLike], what: str = "output"
) -> None:
    """Refuse an output that is, holds or lies inside an input (symbolic links resolved)."""
    for given, path in _local_inputs(inputs):
        if _is_within(path, out):
            relation = "is" if path == out else "contains"
            raise TransplantError(
                f"{what} {shown} {relation} the input {given}: refusing to write there, "
                "even with --overwrite (choose another path)"
            )
        if path.is_dir() and _is_within(out, path):
            raise TransplantError(
                f"{what} {shown} is inside the input {given}: inputs are never modified "
                "(choose another path)"
            )


def refuse_empty(shown: str, what: str) -> None:
    """An empty path (an unset shell variable) would mean the current directory."""
    if not shown:
        raise TransplantError(f"{what} is empty (an unset variable?): give a path")


def refuse_clashes(files: dict[str, str], out: Path | None, out_shown: str | None) -> None:
    """Output files (``--report``, ``--plot``) must be neither OUT, nor inside it (they are
    written once OUT is published), nor one another."""
    seen: dict[Path, str] = {}
    for option, path in files.items():
        target = _resolved(path)
        if out is not None and _is_within(target, out):
            where = "is" if target == out else "lies inside"
            raise TransplantError(
                f"{option} {path} {where} the output directory {out_shown}: give a file "
                "outside it (the report is written into it anyway)"
            )
        if target in seen:
            raise TransplantError(
                f"{seen[target]} and {option} are the same file {path}: give two paths"
            )
        seen[target] = option


def _writable_directory(directory: Path, shown: str, what: str) -> None:
    """The nearest existing ancestor of ``directory`` must be a directory we may write."""
    existing = directory
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise TransplantError(f"cannot write {what} {shown}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TransplantError(f"cannot write {what} {shown}: {existing} is not writable")


def _removable_tree(out: Path, shown: str) -> None:
    """Every directory of ``out`` must be writable, or replacing it would fail half way."""
    for directory, _, _ in os.walk(out):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise TransplantError(
                f"cannot replace {shown}: {directory} is not writable (its files could not "
                "be removed)"
            )


def check_output_path(
    out_path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """The absolute, resolved OUT, or a one-line error if it cannot or must not be published.

    ``inputs`` are the paths the command reads (models, a recipe, a merge configuration).
    """
    shown = _display(out_path)
    refuse_empty(shown, "output path")
    lexical = Path(os.path.abspath(os.path.expanduser(shown)))
    if lexical.is_symlink():
        target = os.readlink(lexical)
        raise TransplantError(
            f"output path {shown} is a symbolic link (to {target}): give a real directory"
        )
    out = _resolved(shown)
    if out.parent == out:
        raise TransplantError(f"output path {shown} is the root directory")
    if out.exists() and not out.is_dir():
        raise TransplantError(f"output path {shown} is a file")
    refuse_inputs(out, shown, inputs, "output directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TransplantError(
                f"output directory {shown} is not empty (use --overwrite to replace it)"
            )
        _removable_tree(out, shown)
    _writable_directory(out.parent, shown, "output directory")
    return out


def check_output_file(
    path: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """A file a command will write (``--report``, ``--json``, ``--plot``), checked up front:
    its folder exists and is writable, it is not a directory and not an input."""
    shown = _display(path)
    refuse_empty(shown, option)
    target = _resolved(shown)
    if target.is_dir():
        raise TransplantError(f"{option} {shown} is a directory")
    refuse_inputs(target, shown, inputs, option)
    if not target.parent.is_dir():
        raise TransplantError(f"{option} {shown}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise TransplantError(f"{option} {shown}: folder {target.parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise TransplantError(f"{option} {shown} is not writable")
    return target


def _missing_ancestors(directory: Path) -> list[Path]:
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    return missing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def staged_output(
    out_path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a staging directory that replaces ``out_path`` only if the block succeeds.

    On any error or interruption the staging directory (and any folder made for OUT) is
    removed and OUT is exactly what it was before.
    """
    inputs = tuple(inputs)
    out = check_output_path(out_path, overwrite, inputs)
    created = _missing_ancestors(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out), dir=out.parent))
    already = len(_published)
    try:
        yield staging
        _publish(staging, out, _display(out_path), overwrite)
    finally:
        if out not in _published[already:]:
            with signals_held():
                _remove(staging)
                for directory in created:
                    with contextlib.suppress(OSError):
                        directory.rmdir()


NAME_MAX = 255
"""Bytes in a file name on Linux filesystems; staging names are kept within it."""
RANDOM_SUFFIX = 8
"""Characters ``mkdtemp`` appends (letters, digits and ``_``)."""


@functools.cache
def machine_tag() -> str:
    """8 hex digits naming this machine, boot and PID namespace: a staging directory with
    this tag was made by a process whose PID means the same here and now."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            boot_id = boot.read().strip()
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        boot_id, namespace = "unknown", "unknown"
    text = f"{socket.gethostname()} {boot_id} {namespace}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def staging_prefix(out: Path, kind: str = "partial") -> str:
    """``.OUT.partial-PID.TAG-``: the owner's PID and machine tag, with OUT's name cut so
    that the whole name, random suffix included, fits in ``NAME_MAX`` bytes."""
    owner = f".{kind}-{os.getpid()}.{machine_tag()}-"
    budget = NAME_MAX - 1 - len(owner) - RANDOM_SUFFIX
    name = os.fsencode(out.name)[:budget].decode("utf-8", errors="ignore")
    return f".{name}{owner}"


_STAGING = re.compile(r"\.partial-(\d+)\.([0-9a-f]{8})-[A-Za-z0-9_]+")


def _owner_is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def sweep_stale_staging(out: Path) -> None:
    """Remove the staging directories of OUT that runs of this tool left when killed: named
    by :func:`staging_prefix`, made on this machine, boot and PID namespace by a process
    that no longer exists, and owned by this user. Others that look stale (another machine's,
    or a name without an owner) are reported, never removed."""
    prefix = staging_prefix(out).rsplit(".partial-", 1)[0]
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix + ".partial-"):
            continue
        found = _STAGING.fullmatch(entry.name[len(prefix) :])
        if entry.is_symlink() or not entry.is_dir() or entry.stat().st_uid != os.getuid():
            continue
        if found is None or found.group(2) != machine_tag():
            LOG.warning(
                "%s looks like the staging directory of an interrupted run (of another "
                "machine or version): remove it if no run is writing there",
                entry,
            )
        elif _owner_is_dead(int(found.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _apply_umask(staging: Path) -> None:
    """mkdtemp makes a private directory; give the output the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for path in staging.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _publish(staging: Path, out: Path, shown: str, overwrite: bool) -> None:
    """Rename ``staging`` to ``out``; afterwards ``staging`` holds what ``out`` held, if
    anything. Raises :class:`TransplantError` with OUT as it was."""
    _apply_umask(staging)
    with contextlib.ExitStack() as hold:
        (_held_until[-1] if _held_until else hold).enter_context(signals_held())
        try:
            if overwrite and os.path.lexists(out):
                _replace(staging, out)
            else:
                rename_noreplace(staging, out)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) and not overwrite:
                raise TransplantError(
                    f"{shown} appeared while this run was working (another run?) and was not "
                    "replaced (use --overwrite to replace it)"
                ) from None
            raise TransplantError(f"cannot publish {shown}: {exc.strerror or exc}") from None
        _published.append(out)
        _remove(staging)  # after an exchange, the old OUT


def _replace(staging: Path, out: Path) -> None:
    """Put ``staging`` at ``out``; the old ``out`` ends up at ``staging`` or removed."""
    try:
        rename_exchange(staging, out)
        return
    except RenameUnsupported:
        pass
    retired = Path(tempfile.mkdtemp(prefix=staging_prefix(out, "old"), dir=out.parent))
    previous = retired / "previous"
    try:
        os.rename(out, previous)
    except BaseException:
        retired.rmdir()
        raise
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(previous, out)  # if this failed too, retired keeps the old OUT
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)
