"""A model's checkpoint on disk: its shards, their safetensors headers, and byte-exact copies.

The write stage changes only the vocabulary tensors. Everything else is carried as stored:
shards without a vocabulary tensor are cloned as files, and a shard holding one is rewritten
with every other tensor's bytes copied range by range (``copy_file_range`` where the kernel
has it) and its header metadata kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.io.tasks import LoaderCache

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
COPY_CHUNK = 1 << 30
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
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def clone_file(source: Path, destination: Path) -> None:
    """A copy of ``source``: a filesystem clone where supported, else in-kernel, else plain."""
    with open(source, "rb") as src, open(destination, "wb", buffering=0) as dst:
        with contextlib.suppress(OSError):
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return
        size = os.fstat(src.fileno()).st_size
        copy_range(src.fileno(), dst, 0, size)


def copy_range(src_fd: int, dst, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to the unbuffered file ``dst``."""
    end = offset + count
    try:
        while offset < end:
            copied = os.copy_file_range(src_fd, dst.fileno(), min(COPY_CHUNK, end - offset), offset)
            if copied == 0:
                raise OSError(errno.EIO, "source ended early")
            offset += copied
    except OSError as exc:
        if exc.errno not in UNSUPPORTED_COPY_ERRNOS:
            raise
        while offset < end:
            chunk = os.pread(src_fd, min(64 << 20, end - offset), offset)
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


def write_passthrough(
    checkpoint: Checkpoint, directory: Path, replacements: dict[str, torch.Tensor]
) -> None:
    """The checkpoint in ``directory`` with ``replacements`` swapped in, shard for shard."""
    shards_with_replacements = {checkpoint.index.tensor_paths[name] for name in replacements}
    for filename in checkpoint.shard_files():
        source, destination = checkpoint.directory / filename, directory / filename
        destination.parent.mkdir(parents=True, exist_ok=True)
        if filename in shards_with_replacements:
            mine = {
                n: t
                for n, t in replacements.items()
                if checkpoint.index.tensor_paths[n] == filename
            }
            rewrite_shard(source, destination, mine)
        else:
            clone_file(source, destination)
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
