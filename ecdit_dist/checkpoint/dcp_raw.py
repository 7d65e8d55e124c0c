"""Reading the tensors of a DCP checkpoint straight from its `.distcp` files.

DCP's `FileSystemWriter` stores every saved chunk of a tensor as one item inside a `.distcp`
file, at the offset and length that `.metadata` records (read here with the restricted
unpickler of safe_load.py). In the default format an item is an uncompressed `torch.save`
archive: a small zip whose `data/<key>` record holds the chunk's raw bytes. This module
finds those bytes once per chunk (the archive's directory and its tiny `data.pkl`, read by an
unpickler that admits only a tensor's rebuild record) and then reads them with `os.preadv`
directly into the caller's memory, or hands out their location so that a writer can copy
them file to file (`copy_file_range`) without them ever entering this process. No `dcp.load`
runs, no per-item `torch.load`, no intermediate copy of a chunk that covers whole rows.

Whatever is not plain (an item with stream transforms, a big-endian archive, a chunk stored
as a strided view) is read through `safe_load.load` instead: slower, same result.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecdit_dist.checkpoint import safe_load
from ecdit_dist.checkpoint.errors import CheckpointError

_STORAGES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
             "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
             "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
             "BoolStorage": torch.bool}
_ZIP_LOCAL = struct.Struct("<IHHHHHIIIHH")          # a zip local file header (30 bytes)


@dataclass(frozen=True)
class Extent:
    """`length` bytes at `offset` of `path` are bytes [dest, dest + length) of a tensor in row-major order."""
    path: Path
    offset: int
    length: int
    dest: int


@dataclass
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path
    item_offset: int
    item_length: int
    plain: bool                    # no stream transforms
    data_offset: int | None = None     # absolute offset of the chunk's raw row-major bytes, once found
    raw: bool | None = None            # None: not looked at yet; False: read it through DCP


class _View(io.RawIOBase):
    """A read-only file view of [start, start + length) of an open file descriptor (positional reads)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos) if n else b""
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


class _TensorRecord(pickle.Unpickler):
    """Unpickles a torch.save `data.pkl` of one tensor into (storage key, dtype, storage offset, size, stride);
    anything but a tensor rebuild record is refused (the caller then reads the item through DCP)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError("unexpected storage record")
        return (str(pid[2]), pid[1], int(pid[4]))


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def row_block(offsets: tuple[int, ...], sizes: tuple[int, ...], full: tuple[int, ...]) -> int | None:
    """Where a chunk's row-major bytes start in the full tensor's row-major bytes (in elements) when
    they form one contiguous range of it (e.g. a dim-0 shard), else None."""
    k = 0
    while k < len(full) and sizes[k] == 1:
        k += 1
    if any(sizes[i] != full[i] for i in range(k + 1, len(full))):
        return None
    strides = _contiguous_strides(full)
    return sum(o * s for o, s in zip(offsets, strides))


class RawDCP:
    """The tensors under `prefix` of a DCP checkpoint folder, read from the `.distcp` bytes.

    Thread-safe: chunks are located once under a lock; reads are positional (`os.preadv`) on
    per-call file descriptors, so several threads read at once.
    """

    def __init__(self, folder: str | Path, prefix: str = "model") -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

        self.folder = Path(folder)
        self.prefix = prefix
        md = safe_load.read_metadata(self.folder)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.chunks: dict[str, list[_Chunk]] = {}
        for key, m in md.state_dict_metadata.items():
            if not (key.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata)):
                continue
            name = key[len(prefix) + 1:]
            self.shapes[name] = tuple(m.size)
            self.dtypes[name] = m.properties.dtype
            chunks = []
            for c in m.chunks:
                info = md.storage_data.get(MetadataIndex(key, c.offsets))
                if info is None:
                    raise CheckpointError(f"{self.folder}/.metadata lists a chunk of {key} at {tuple(c.offsets)} "
                                          f"without a storage location")
                rel = Path(info.relative_path)
                if rel.is_absolute() or ".." in rel.parts:
                    raise CheckpointError(f"{self.folder}/.metadata places {key} outside the folder: {rel}")
                chunks.append(_Chunk(tuple(c.offsets), tuple(c.sizes), self.folder / rel, int(info.offset),
                                     int(info.length), not getattr(info, "transform_descriptors", None)))
            self.chunks[name] = chunks
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ locating chunk bytes
    def _locate(self, name: str, chunk: _Chunk) -> bool:
        """Find the raw bytes of a chunk inside its item; False when it must be read through DCP."""
        if chunk.raw is not None:
            return chunk.raw
        with self._lock:
            if chunk.raw is None:
                chunk.data_offset = self._find_data(name, chunk)
                chunk.raw = chunk.data_offset is not None
        return chunk.raw

    def _find_data(self, name: str, chunk: _Chunk) -> int | None:
        if not chunk.plain:
            return None
        nbytes = math.prod(chunk.sizes) * _itemsize(self.dtypes[name])
        fd = os.open(chunk.path, os.O_RDONLY)
        try:
            head = os.pread(fd, 4, chunk.item_offset)
            if head != b"PK\x03\x04":
                # DCP's safetensors-style items hold the raw bytes themselves
                return chunk.item_offset if chunk.item_length == nbytes else None
            try:
                with zipfile.ZipFile(_View(fd, chunk.item_offset, chunk.item_length)) as zf:
                    members = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
                    if "byteorder" in members and zf.read(members["byteorder"]).strip() != b"little":
                        return None
                    pkl = members.get("data.pkl")
                    if pkl is None:
                        return None
                    storage, offset, size, stride = _TensorRecord(io.BytesIO(zf.read(pkl))).load()
                    key, dtype, numel = storage
                    rec = members.get(f"data/{key}")
                    if (rec is None or rec.compress_type != zipfile.ZIP_STORED or dtype != self.dtypes[name]
                            or size != chunk.sizes or stride != _contiguous_strides(size)
                            or (offset + math.prod(size)) * _itemsize(dtype) > rec.file_size):
                        return None
                    local = _ZIP_LOCAL.unpack(os.pread(fd, _ZIP_LOCAL.size, chunk.item_offset + rec.header_offset))
                    if local[0] != 0x04034B50:
                        return None
                    start = rec.header_offset + _ZIP_LOCAL.size + local[9] + local[10]
                    begin = chunk.item_offset + start + offset * _itemsize(dtype)
                    if begin + nbytes > chunk.item_offset + chunk.item_length:
                        return None
                    return begin
            except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError, EOFError, KeyError):
                return None
        finally:
            os.close(fd)

    def extents(self, name: str) -> list[Extent] | None:
        """The file ranges that hold the tensor's row-major bytes, in order, when every chunk is a
        contiguous block of rows stored as plain bytes; None otherwise (then use `read_into`)."""
        full = self.shapes[name]
        item = _itemsize(self.dtypes[name])
        out = []
        for c in self.chunks[name]:
            start = row_block(c.offsets, c.sizes, full)
            if start is None or not self._locate(name, c):
                return None
            out.append(Extent(c.path, c.data_offset, math.prod(c.sizes) * item, start * item))
        out.sort(key=lambda e: e.dest)
        covered = 0
        for e in out:
            if e.dest != covered:
                return None
            covered += e.length
        return out if covered == math.prod(full) * item else None

    # ------------------------------------------------------------------ reading
    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (contiguous, the tensor's shape and dtype) with the tensor."""
        full = self.shapes[name]
        if tuple(out.shape) != full or out.dtype != self.dtypes[name] or not out.is_contiguous():
            raise ValueError(f"{name}: buffer {tuple(out.shape)} {out.dtype} for {full} {self.dtypes[name]}")
        flat = out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8)
        item = _itemsize(out.dtype)
        for c in self.chunks[name]:
            if not self._locate(name, c):
                return self._read_dcp(name, out)
            nbytes = math.prod(c.sizes) * item
            start = row_block(c.offsets, c.sizes, full)
            if start is not None:
                _pread_into(c.path, flat[start * item: start * item + nbytes], c.data_offset)
            else:
                tmp = torch.empty(c.sizes, dtype=out.dtype)
                _pread_into(c.path, tmp.view(-1).view(torch.uint8), c.data_offset)
                region = out
                for d, (o, s) in enumerate(zip(c.offsets, c.sizes)):
                    region = region.narrow(d, o, s)
                region.copy_(tmp)
                del tmp
        return out

    def _read_dcp(self, name: str, out: torch.Tensor) -> torch.Tensor:
        state = {f"{self.prefix}.{name}": out}
        safe_load.load(state, self.folder)
        got = state[f"{self.prefix}.{name}"]
        if got.data_ptr() != out.data_ptr():
            out.copy_(got)
        return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pread_into(path: Path, dest: torch.Tensor, offset: int) -> None:
    """Read len(dest) bytes at `offset` of `path` straight into the uint8 tensor `dest`."""
    n = dest.numel()
    if n == 0:
        return
    view = memoryview(dest.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done: done + (1 << 30)]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{path} ends before byte {offset + n} (truncated checkpoint file)")
            done += got
    finally:
        os.close(fd)
