"""Streaming conversions: tensor sources, bounded staging, and a parallel safetensors shard writer.

Interfaces (what a converter, or a remote store, plugs in):

* A **source** (`TensorSource`) lists its tensors (`infos`: name -> TensorInfo, in its order)
  and reads one by name: `read_into(name, out)` fills a caller-owned buffer (so memory stays
  with the caller's bounded staging), `extents(name)` says where the tensor's row-major bytes lie
  in local files when they can be copied file to file (else None), `read_range(name, start,
  length)` returns a byte range of one tensor. `DCPSource` and `SafetensorsSource`
  (tensors.py) are the local sources; a remote one only needs `infos`, `read_into`,
  `read_range` and `describe`, and returns None from `extents`.
* The **writer** (`write_shards`) plans the shards from the infos and writes them in order:
  each shard file is created under a hidden temporary name, pre-sized, its header written, and
  its tensors are written at their offsets by a small pool of worker threads (`os.pwrite`, or
  `copy_file_range` for bytes that need no conversion); when all its tensors are written, the
  file is fsynced and renamed. `on_shard(path, shard)` is then called for each finished shard,
  strictly in shard order, from the calling thread; an uploader may upload the file and delete it.
* **Staging** (`StagingPool`): `buffers` slots; a job that produces a tensor in memory holds
  one slot while it reads, converts and writes; a slot keeps its buffers (by role, e.g. "in"
  and "out") and reuses them, so memory is at most `buffers` x (the largest tensor's bytes per
  role) above the process, whatever the model size. File-to-file copies take no slot.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Protocol

import torch

from ecdit_dist.checkpoint.dcp_raw import Extent
from ecdit_dist.checkpoint.tensors import ConvertError, Shard, TensorInfo, _header, plan_shards, write_index

DEFAULT_WORKERS = 4
DEFAULT_BUFFERS = 2
_COPY_CHUNK = 1 << 30


class TensorSource(Protocol):
    infos: dict[str, TensorInfo]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor: ...

    def extents(self, name: str) -> list[Extent] | None: ...

    def read_range(self, name: str, start: int, length: int) -> bytes: ...

    def describe(self) -> str: ...


class Staging:
    """One slot of reusable host buffers, by role; a buffer grows to the largest request and stays."""

    def __init__(self) -> None:
        self._raw: dict[str, torch.Tensor] = {}

    def buffer(self, role: str, info: TensorInfo) -> torch.Tensor:
        raw = self._raw.get(role)
        if raw is None or raw.numel() < info.nbytes:
            self._raw.pop(role, None)
            del raw
            raw = self._raw[role] = torch.empty(max(info.nbytes, 1), dtype=torch.uint8)
        return raw[: info.nbytes].view(info.dtype).view(info.shape)

    def nbytes(self) -> int:
        return sum(r.numel() for r in self._raw.values())


class StagingPool:
    """`buffers` staging slots shared by the worker threads (a job blocks until one is free)."""

    def __init__(self, buffers: int = DEFAULT_BUFFERS) -> None:
        self._free: queue.Queue[Staging] = queue.Queue()
        for _ in range(max(1, buffers)):
            self._free.put(Staging())

    def slot(self):
        pool = self

        class _Slot:
            def __enter__(self) -> Staging:
                self.s = pool._free.get()
                return self.s

            def __exit__(self, *exc) -> None:
                pool._free.put(self.s)

        return _Slot()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done, n = 0, len(data)
    while done < n:
        done += os.pwrite(fd, data[done: done + _COPY_CHUNK], offset + done)


def copy_range(src: Path, dst_fd: int, src_offset: int, length: int, dst_offset: int) -> None:
    """Copy bytes file to file, in the kernel (`copy_file_range`) where the filesystems allow,
    else through a small bounded buffer."""
    fd = os.open(src, os.O_RDONLY)
    try:
        done = 0
        use_kernel = hasattr(os, "copy_file_range")
        while done < length:
            if use_kernel:
                try:
                    n = os.copy_file_range(fd, dst_fd, min(length - done, _COPY_CHUNK), src_offset + done,
                                           dst_offset + done)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    use_kernel = False
                    continue
            else:
                data = os.pread(fd, min(length - done, 16 << 20), src_offset + done)
                n = len(data)
                if n:
                    _pwrite_all(dst_fd, memoryview(data), dst_offset + done)
            if n <= 0:
                raise ConvertError(f"{src} ends before byte {src_offset + length} (truncated input file)")
            done += n
    finally:
        os.close(fd)


class _ShardFile:
    def __init__(self, out: Path, shard: Shard, header: bytes, remaining: int) -> None:
        self.shard = shard
        self.tmp = out / f".{shard.file}.tmp"
        self.final = out / shard.file
        self.data_start = len(header)
        self.remaining = remaining
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        size = len(header) + shard.nbytes
        try:
            os.posix_fallocate(self.fd, 0, size) if size else None
        except OSError:
            os.ftruncate(self.fd, size)
        _pwrite_all(self.fd, memoryview(header), 0)

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.final)

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_shards(out_dir: str | Path, infos: dict[str, TensorInfo],
                 read: Callable[[str, Staging], torch.Tensor], max_bytes: int = 0,
                 metadata: dict[str, str] | None = None, progress: Callable[[int], object] | None = None,
                 extents: Callable[[str], list[Extent] | None] | None = None, workers: int = DEFAULT_WORKERS,
                 buffers: int = DEFAULT_BUFFERS, on_shard: Callable[[Path, Shard], object] | None = None,
                 shard_gate: Callable[[], object] | None = None) -> list[Shard]:
    """Write `infos` as consolidated safetensors shards (+ index when sharded) into `out_dir`.

    Per tensor: `extents(name)` (when given and not None) lists file ranges copied as they are;
    otherwise `read(name, staging)` returns the tensor (exactly infos[name]; it may be a view of
    the staging slot's buffers), which is written while the slot is held. Same bytes, header and
    order as a sequential write (`tensors.write_safetensors`), whatever `workers`.
    `shard_gate` (optional): called before each shard is opened, once the previous shards are
    all written; with it, one shard at a time is being written (an uploader bounds local disk by
    blocking in it until it has taken the finished shards away).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(infos, max_bytes)
    meta = metadata or {"format": "pt"}
    pool = StagingPool(buffers)
    lock = threading.Lock()
    files: dict[int, _ShardFile] = {}
    finished: dict[int, bool] = {}

    def job(si: int, name: str, offset: int) -> int:
        f = files[si]
        info = infos[name]
        ranges = extents(name) if extents is not None else None
        if ranges is not None:
            for e in ranges:
                copy_range(e.path, f.fd, e.offset, e.length, f.data_start + offset + e.dest)
        else:
            with pool.slot() as staging:
                t = read(name, staging)
                if tuple(t.shape) != info.shape or t.dtype != info.dtype:
                    raise ConvertError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {info.shape} {info.dtype}")
                t = t.detach().contiguous().cpu()
                if info.nbytes:
                    _pwrite_all(f.fd, memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B"),
                                f.data_start + offset)
                del t
        with lock:
            f.remaining -= 1
            last = f.remaining == 0
        if last:
            f.finish()
            finished[si] = True
        return info.nbytes

    workers = max(1, int(workers))
    delivered = 0
    inflight: set[Future] = set()

    def settle(block: bool) -> None:
        nonlocal delivered, inflight
        if block and inflight:
            done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
        else:
            done = {f for f in inflight if f.done()}
            inflight -= done
        for fut in done:
            n = fut.result()                       # re-raises a worker's error here
            if progress:
                progress(n)
        while delivered < len(shards) and finished.get(delivered):
            if on_shard is not None:
                on_shard(out / shards[delivered].file, shards[delivered])
            delivered += 1

    executor = ThreadPoolExecutor(workers, thread_name_prefix="shard-writer")
    try:
        for si, shard in enumerate(shards):
            if shard_gate is not None:
                while inflight:
                    settle(block=True)
                shard_gate()
            files[si] = _ShardFile(out, shard, _header(infos, shard.names, meta), len(shard.names))
            if not shard.names:
                files[si].finish()
                finished[si] = True
            offset = 0
            for name in shard.names:
                while len(inflight) >= 2 * workers:
                    settle(block=True)
                inflight.add(executor.submit(job, si, name, offset))
                offset += infos[name].nbytes
            settle(block=False)
        while inflight:
            settle(block=True)
        settle(block=False)
    except BaseException:
        for f in inflight:
            f.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
        for f in files.values():
            f.abandon()
        raise
    executor.shutdown(wait=True)
    write_index(out, shards)
    return shards
