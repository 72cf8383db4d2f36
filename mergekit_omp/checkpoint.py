"""A model's checkpoint on disk: its shards, their safetensors headers, and byte-exact copies.

The write stage changes only the vocabulary tensors. Everything else is carried as stored:
shards without a vocabulary tensor are cloned as files, and a shard holding one is rewritten
with every other tensor's bytes copied range by range (``copy_file_range`` where the kernel
has it) and its header metadata kept.

A file is cloned by the filesystem where it can (XFS, Btrfs: a metadata operation). Elsewhere
it is written with ``O_DIRECT``, from the kernel's cached pages of the source straight to the
disk: writing through the page cache (``copy_file_range``, or ``write``) costs 1.3 to 2.7 s of
CPU per GB on our 2-core VMs, against 0.2 s with ``O_DIRECT``, and that CPU is taken from the
OMP running beside the copy (docs/architectures.md). Filesystems without ``O_DIRECT`` (tmpfs)
get ``copy_file_range``, then a plain copy.

The shards without a vocabulary tensor are known once the model is loaded, so a
:class:`ShardCopy` can clone them in a thread of its own while the vocabulary matrices are
being computed (the kernel's copy runs without Python's lock); ``write_passthrough`` then
rewrites the other shards and waits for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.io.tasks import LoaderCache

from mergekit_omp.errors import TransplantError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
COPY_CHUNK = 64 << 20
"""Bytes per ``copy_file_range`` call: a cancelled background copy stops within one."""
DIRECT_CHUNK = 8 << 20
"""Bytes per ``O_DIRECT`` write, the buffer the copy holds (a multiple of any block size;
the only size measured: 2.7 GB in 1.75 to 2.1 s with 0.6 s of CPU on our 2-core VM)."""
DIRECT_ALIGN = 4096
"""The last ``O_DIRECT`` write is padded to this, then the file is truncated to its size."""
UNSUPPORTED_COPY_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


@dataclass(frozen=True)
class Checkpoint:
    """Where each tensor of a model is stored (mergekit's index of the local copy)."""

    index: ShardedTensorIndex

    @classmethod
    def of(cls, reference: ModelReference) -> Checkpoint:
        return cls(LoaderCache().get(reference).index)

    @property
    def directory(self) -> Path:
        return Path(self.index.base_path)

    @property
    def is_safetensors(self) -> bool:
        return self.index.is_safetensors

    @property
    def names(self) -> list[str]:
        return list(self.index.tensor_paths)

    def shard_files(self) -> list[str]:
        return [shard.filename for shard in self.index.shards]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape from the safetensors headers (no data read); {} for .bin."""
        if not self.is_safetensors:
            return {}
        shapes: dict[str, tuple[int, ...]] = {}
        for filename in self.shard_files():
            _, header = read_header(self.directory / filename)
            shapes.update(
                (name, tuple(entry["shape"]))
                for name, entry in header.items()
                if name != "__metadata__"
            )
        return shapes


def read_header(path: Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, the JSON header) of a safetensors file."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            return 8 + length, json.loads(handle.read(length))
        except (struct.error, ValueError) as exc:
            raise TransplantError(f"{path} is not a safetensors file ({exc})") from None


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""The checkpoints mergekit looks for, each alone or with ``NAME.index.json`` and shards."""
FILE_KINDS = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
}


def check_model_files(directory: str) -> None:
    """Before anything in a local model directory is read: every entry is a regular file or
    a folder (a named pipe would block a reader forever), and every shard an index names lies
    inside the directory (symbolic links, as in the hub's cache, are followed as usual)."""
    for entry in sorted(os.listdir(directory)):
        require_regular(os.path.join(directory, entry))
    for name in WEIGHT_FILES:
        index = os.path.join(directory, name + ".index.json")
        if os.path.isfile(index):
            for shard in indexed_shards(index):
                require_inside(directory, index, shard)
                require_regular(os.path.join(directory, shard))


def require_regular(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing or a dangling link: reading it says so
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise TransplantError(f"{path} is {kind}, not a regular file: refusing to read it")


def indexed_shards(index: str) -> list[str]:
    """The shard file names of a checkpoint index (none if mergekit could not read it
    either: its own error says why)."""
    require_regular(index)
    try:
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        return sorted({str(shard) for shard in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def require_inside(directory: str, index: str, shard: str) -> None:
    """A shard name is a relative path that stays inside the model directory."""
    normal = os.path.normpath(shard)
    if os.path.isabs(shard) or normal == ".." or normal.startswith(".." + os.sep):
        raise TransplantError(
            f"{index} names the shard {shard}, outside the model directory: shards must lie "
            "inside it (refusing to read it)"
        )


class CopyCancelled(Exception):
    """A background copy was told to stop."""


Stop = Callable[[], bool]
"""Asked between chunks of a copy: True to abandon it (:class:`CopyCancelled`)."""


def _never() -> bool:
    return False


def clone_file(source: Path, destination: Path, stop: Stop = _never) -> None:
    """A copy of ``source``: a filesystem clone where supported, else ``O_DIRECT`` writes,
    else in-kernel, else plain (module docstring)."""
    with open(source, "rb") as src, open(destination, "wb", buffering=0) as dst:
        with contextlib.suppress(OSError):
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return
        size = os.fstat(src.fileno()).st_size
        if not copy_direct(src.fileno(), destination, size, stop):
            copy_range(src.fileno(), dst, 0, size, stop)


def copy_direct(src_fd: int, destination: Path, size: int, stop: Stop = _never) -> bool:
    """Write ``size`` bytes of ``src_fd`` into the empty file ``destination`` with
    ``O_DIRECT``; False, with nothing written, where the filesystem does not take it."""
    direct = getattr(os, "O_DIRECT", None)
    if direct is None:
        return False
    try:
        dst_fd = os.open(destination, os.O_WRONLY | direct)
    except OSError as exc:
        if exc.errno not in UNSUPPORTED_COPY_ERRNOS:
            raise
        return False
    buffer = mmap.mmap(-1, DIRECT_CHUNK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buffer)
    try:
        offset = 0
        while offset < size:
            if stop():
                raise CopyCancelled
            count = _read_exactly(src_fd, view[: min(DIRECT_CHUNK, size - offset)], offset)
            padded = -(-count // DIRECT_ALIGN) * DIRECT_ALIGN
            try:
                written = os.pwritev(dst_fd, [view[:padded]], offset)
            except OSError as exc:
                if offset == 0 and exc.errno in UNSUPPORTED_COPY_ERRNOS:
                    return False
                raise
            if written != padded:
                raise OSError(errno.EIO, f"short write to {destination}")
            offset += count
        os.ftruncate(dst_fd, size)
        return True
    finally:
        os.close(dst_fd)
        view.release()
        with contextlib.suppress(BufferError):  # a traceback may still hold a slice
            buffer.close()


def _read_exactly(fd: int, into: memoryview, offset: int) -> int:
    """Fill ``into`` from ``fd`` at ``offset`` (``preadv`` may return less than asked)."""
    done = 0
    while done < len(into):
        count = os.preadv(fd, [into[done:]], offset + done)
        if count == 0:
            raise OSError(errno.EIO, "source ended early")
        done += count
    return done


def copy_range(src_fd: int, dst, offset: int, count: int, stop: Stop = _never) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to the unbuffered file ``dst``."""
    end = offset + count
    try:
        while offset < end:
            if stop():
                raise CopyCancelled
            copied = os.copy_file_range(src_fd, dst.fileno(), min(COPY_CHUNK, end - offset), offset)
            if copied == 0:
                raise OSError(errno.EIO, "source ended early")
            offset += copied
    except OSError as exc:
        if exc.errno not in UNSUPPORTED_COPY_ERRNOS:
            raise
        while offset < end:
            if stop():
                raise CopyCancelled from exc
            chunk = os.pread(src_fd, min(COPY_CHUNK, end - offset), offset)
            if not chunk:
                raise OSError(errno.EIO, "source ended early") from exc
            dst.write(chunk)
            offset += len(chunk)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def rewrite_shard(source: Path, destination: Path, replacements: dict[str, torch.Tensor]) -> int:
    """Copy a safetensors shard, replacing the tensors named in ``replacements``.

    Tensors keep their order in the file; every other tensor's bytes are copied unchanged,
    and so is the header's ``__metadata__``. Returns the bytes of tensor data written.
    """
    data_start, header = read_header(source)
    metadata = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    new_header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, entry in entries:
        if name in replacements:
            tensor = replacements[name]
            size = tensor.numel() * tensor.element_size()
            entry = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape)}
        else:
            begin, end = entry["data_offsets"]
            size = end - begin
        new_header[name] = {**entry, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(new_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(source, "rb") as src, open(destination, "wb", buffering=0) as dst:
        dst.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, entry in entries:
            if name in replacements:
                _write_all(dst, _tensor_bytes(replacements[name]))
            else:
                begin, end = entry["data_offsets"]
                copy_range(src.fileno(), dst, data_start + begin, end - begin)
    return offset


def _write_all(dst, data: memoryview) -> None:
    while len(data):
        written = dst.write(data)
        data = data[written:]


def tensor_data_bytes(path: Path) -> int:
    data_start, _ = read_header(path)
    return path.stat().st_size - data_start


def shards_holding(checkpoint: Checkpoint, names: Iterable[str]) -> set[str]:
    """The shard files that store any of the tensors ``names``."""
    return {checkpoint.index.tensor_paths[name] for name in names}


@dataclass
class ShardCopy:
    """Clones ``shards`` of ``checkpoint`` into ``directory`` in a thread of its own.

    :meth:`join` waits for it and raises its error, if any, as the ``OSError`` it was;
    :meth:`cancel` stops it within one chunk and waits, raising nothing. Either must be
    called before ``directory`` is removed or published.
    """

    checkpoint: Checkpoint
    directory: Path
    shards: tuple[str, ...]
    seconds: float = field(default=0.0, init=False)
    """How long the thread copied (it overlaps whatever the caller did meanwhile)."""
    _error: BaseException | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> ShardCopy:
        self._thread = threading.Thread(target=self._run, name="mergekit-omp shard copy")
        self._thread.daemon = True
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            for filename in self.shards:
                destination = self.directory / filename
                destination.parent.mkdir(parents=True, exist_ok=True)
                clone_file(self.checkpoint.directory / filename, destination, self._stop.is_set)
        except CopyCancelled:
            pass
        except BaseException as exc:  # handed to the thread that joins
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def cancel(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._error = None


def write_passthrough(
    checkpoint: Checkpoint,
    directory: Path,
    replacements: dict[str, torch.Tensor],
    copying: ShardCopy | None = None,
) -> None:
    """The checkpoint in ``directory`` with ``replacements`` swapped in, shard for shard.

    ``copying`` is a :class:`ShardCopy` into ``directory`` already under way, of shards
    holding no replacement: they are left to it, and it is waited for.
    """
    rewritten = shards_holding(checkpoint, replacements)
    copied = set(copying.shards) if copying is not None else set()
    if rewritten & copied:
        raise ValueError(f"shards being copied hold vocabulary tensors: {rewritten & copied}")
    for filename in checkpoint.shard_files():
        if filename in copied:
            continue
        source, destination = checkpoint.directory / filename, directory / filename
        destination.parent.mkdir(parents=True, exist_ok=True)
        if filename in rewritten:
            mine = {
                n: t
                for n, t in replacements.items()
                if checkpoint.index.tensor_paths[n] == filename
            }
            rewrite_shard(source, destination, mine)
        else:
            clone_file(source, destination)
    if copying is not None:
        copying.join()
    index_path = checkpoint.directory / SAFETENSORS_INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        total = sum(tensor_data_bytes(directory / f) for f in checkpoint.shard_files())
        index.setdefault("metadata", {})["total_size"] = total
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_files(source: Path, destination: Path, names: list[str]) -> list[str]:
    """Copy those of ``names`` (files or folders) that exist in ``source``; returns them."""
    copied = []
    for name in names:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, destination / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copyfile(path, destination / name)
        else:
            continue
        copied.append(name)
    return copied
