"""Checkpoints on S3: `s3://` sources and destinations for every `ecdit convert` command.

Sources read with ranged GETs only; no whole file is downloaded to read one tensor, and no
more than one tensor is held at a time (two while DCP copies one out of its framing):

- `S3SafetensorsSource`: consolidated safetensors (`config.json` + one file, a folder of
  shards with `model.safetensors.index.json`, or a folder of `*.safetensors`). Each shard's
  header is read once (a ranged GET of its first bytes); a tensor is read with ranged GETs of
  exactly its bytes (`chunk_bytes` each, `READ_WORKERS` in flight), straight into the tensor.
- `S3DCPSource`: a committed training checkpoint, either a step folder
  (`.../checkpoints/step-00000042`) or a run prefix whose `checkpoints/latest` names one (the
  layout `checkpoint.mirror` writes). Its small files (`manifest.json`, `meta.json`,
  `.metadata`) are fetched into a private local folder and checked against the manifest;
  the data files are read by DCP through a seekable ranged-GET file, so DCP reshards any
  saved layout exactly as from disk. `verify=True` streams every data file once through
  sha256 (memory: one chunk) and compares it with the manifest.

Both implement the interface of the local sources in tensors.py: `infos` (name ->
TensorInfo, in stored order), `load(name, out=None) -> Tensor` (into `out` when given),
`describe() -> str`; plus `read_config() -> dict` (the {"model", "moe"} architecture).
`S3DCPSource` is a `DCPSource` whose `folder` is the local copy of the small files, so
`read_meta(src.folder)` works on it as on a local checkpoint.

Destinations (`S3Output`): the converter writes into a local staging folder as usual; a
background thread uploads every finished shard as soon as it is renamed into place
(`put_file`: multipart with a SHA256 checksum per part, verified by the server) and deletes
it locally, and the writer is held back while `max_staged` finished shards wait, so local
disk holds at most a few shards. When the conversion completes the index is uploaded and
`config.json` last: it is the commit marker, and every reader here refuses a consolidated
prefix without it. On an error or an interrupt the objects uploaded so far are deleted; a
killed process leaves shards without `config.json`, which no command reads and which
`--overwrite` replaces. A non-empty destination is refused unless `--overwrite`, which first
deletes the old `config.json` (so the old output stops being readable), then the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import struct
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ecdit_dist.checkpoint import safe_load
from ecdit_dist.checkpoint.errors import CheckpointError
from ecdit_dist.checkpoint.tensors import FROM_ST, INDEX, ConvertError, DCPSource, TensorInfo
from ecdit_dist.data.storage import DataError, S3RangeFile, S3Storage, is_s3, split_s3

CONFIG_JSON = "config.json"
MANIFEST = "manifest.json"
META = "meta.json"
CHUNK_BYTES = 16 << 20      # one ranged GET
READ_WORKERS = 8            # ranged GETs in flight for one large tensor
HEADER_PROBE = 1 << 20
MAX_HEADER = 100 << 20

__all__ = ["is_s3", "S3SafetensorsSource", "S3DCPSource", "S3Output", "open_source", "open_safetensors",
           "check_out", "staged_upload", "paced", "inspect", "import_to_s3", "local_copy"]


_OPEN: "weakref.WeakSet[Any]" = weakref.WeakSet()     # the S3 sources of this process, to refuse writing over one


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _storage() -> S3Storage:
    return S3Storage()


def _url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _exists(s3: S3Storage, url: str) -> bool:
    try:
        s3.head(url)
        return True
    except DataError as e:
        if "not found" in str(e):
            return False
        raise


def _check_name(where: str, name: str) -> str:
    """A file name from an index or manifest must stay inside its prefix."""
    if (not isinstance(name, str) or not name or name.startswith(("/", ".")) or "\\" in name
            or ".." in name.split("/")):
        raise CheckpointError(f"{where} names a file outside its folder: {name!r}")
    return name


def read_into(s3: S3Storage, url: str, start: int, dest: memoryview, chunk_bytes: int = CHUNK_BYTES,
              workers: int = READ_WORKERS) -> None:
    """Bytes [start, start + len(dest)) of an object into `dest`, in ranged GETs of at most
    `chunk_bytes`, up to `workers` at a time, each written straight into its part of `dest`
    (nothing else is kept) and retried whole on a transient error."""
    bucket, key = split_s3(url)

    def get(lo: int, part: memoryview) -> None:
        def once() -> None:
            n = len(part)
            body = s3.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={lo}-{lo + n - 1}")["Body"]
            got = 0
            for piece in body.iter_chunks(1 << 20):
                if got + len(piece) > n:
                    raise DataError(f"{url}: the server sent more than the {n} bytes asked for")
                part[got: got + len(piece)] = piece
                got += len(piece)
            if got != n:
                raise DataError(f"{url}: short read {got} of {n} bytes at offset {lo}")

        s3._call(url, once)

    parts = [(start + o, dest[o: o + chunk_bytes]) for o in range(0, len(dest), chunk_bytes)]
    if len(parts) <= 1 or workers <= 1:
        for lo, part in parts:
            get(lo, part)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(workers, len(parts)), thread_name_prefix="s3-read") as pool:
        for f in [pool.submit(get, lo, part) for lo, part in parts]:
            f.result()


def sha256_remote(s3: S3Storage, url: str, size: int, chunk_bytes: int = 8 << 20) -> str:
    """sha256 of an object, streamed through one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(min(chunk_bytes, max(size, 1)))
    for lo in range(0, size, len(buf)):
        n = min(len(buf), size - lo)
        view = memoryview(buf)[:n]
        read_into(s3, url, lo, view, chunk_bytes)
        h.update(view)
    return h.hexdigest()


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


# ------------------------------------------------------------------------------------ safetensors
class S3SafetensorsSource:
    """Consolidated safetensors under an S3 prefix (or one `.safetensors` object)."""

    def __init__(self, url: str, storage: S3Storage | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.url = url.rstrip("/")
        self.s3 = storage or _storage()
        self.chunk_bytes = chunk_bytes
        self.folder_url = self.url.rsplit("/", 1)[0] if self.url.endswith(".safetensors") else self.url
        self._config = self._read_config()
        self.file_of: dict[str, str] = {}
        self.offset_of: dict[str, int] = {}
        self.infos: dict[str, TensorInfo] = {}
        for f, size in self._files():
            for name, info, offset in self._header(f, size):
                if name in self.file_of:
                    raise ConvertError(f"tensor {name} appears in both {self.file_of[name]} and {f}")
                self.file_of[name], self.infos[name], self.offset_of[name] = f, info, offset
        missing = sorted(set(getattr(self, "_weight_map", {})) - set(self.infos))
        if missing:
            raise ConvertError(f"{_url(self.url, INDEX)} lists tensors no shard holds: {', '.join(missing[:5])}")
        _OPEN.add(self)

    def _read_config(self) -> dict[str, Any]:
        url = _url(self.folder_url, CONFIG_JSON)
        raw = self.s3.get(url)
        if raw is None:
            raise ConvertError(f"{url} not found: not a complete consolidated checkpoint (a conversion writes "
                               f"config.json last, so shards without it are the remains of one that did not "
                               f"finish; write it again with --overwrite)")
        try:
            return json.loads(raw)
        except ValueError:
            raise ConvertError(f"{url} is not valid JSON") from None

    def _files(self) -> list[tuple[str, int]]:
        if self.url.endswith(".safetensors"):
            return [(self.url, self.s3.size(self.url))]
        index_url = _url(self.url, INDEX)
        raw = self.s3.get(index_url)
        listing = {o.path: o.size for o in self.s3.list(self.url + "/")
                   if "/" not in o.path[len(self.url) + 1:]}
        if raw is not None:
            try:
                weight_map = json.loads(raw)["weight_map"]
            except Exception:
                raise ConvertError(f"{index_url} is not a valid index (expected a 'weight_map')") from None
            files = []
            for name in sorted(set(weight_map.values())):
                f = _url(self.url, _check_name(index_url, name))
                if f not in listing:
                    raise ConvertError(f"{index_url} lists {name}, which is missing")
                files.append((f, listing[f]))
            self._weight_map = weight_map
            return files
        files = sorted((p, s) for p, s in listing.items() if p.endswith(".safetensors"))
        if not files:
            raise ConvertError(f"{self.url} holds no *.safetensors files")
        return files

    def _header(self, url: str, size: int) -> Iterator[tuple[str, TensorInfo, int]]:
        if size < 8:
            raise ConvertError(f"{url} is not a readable safetensors file: {size} bytes")
        head = self.s3.read_range(url, 0, min(size, HEADER_PROBE))
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER or 8 + n > size:
            raise ConvertError(f"{url} is not a readable safetensors file: header of {n} bytes in a {size}-byte object")
        raw = head[8: 8 + n] if 8 + n <= len(head) else self.s3.read_range(url, 8, 8 + n)
        try:
            header = json.loads(raw)
        except ValueError:
            raise ConvertError(f"{url} is not a readable safetensors file: its header is not JSON") from None
        base = 8 + n
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = FROM_ST[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                lo, hi = (int(x) for x in entry["data_offsets"])
            except Exception:
                raise ConvertError(f"{url}: header entry {name!r} is malformed") from None
            info = TensorInfo(shape, dtype)
            if hi - lo != info.nbytes or lo < 0 or base + hi > size:
                raise ConvertError(f"{url}: tensor {name} has offsets {lo}..{hi}, which do not fit its shape "
                                   f"{shape} {dtype} or the object's {size} bytes")
            yield name, info, base + lo

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.infos[name]
        target = out if out is not None else torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            read_into(self.s3, self.file_of[name], self.offset_of[name], _bytes_view(target), self.chunk_bytes)
        return target

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.load(name, out)

    def extents(self, name: str):
        return None               # no local file to copy from: read_into (ranged GETs)

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of one tensor, by one ranged read."""
        info = self.infos[name]
        if start < 0 or length < 0 or start + length > info.nbytes:
            raise ConvertError(f"{self.url}: bytes {start}..{start + length} are outside {name} ({info.nbytes} bytes)")
        buf = bytearray(length)
        if length:
            read_into(self.s3, self.file_of[name], self.offset_of[name] + start, memoryview(buf), self.chunk_bytes)
        return bytes(buf)

    def read_config(self) -> dict[str, Any]:
        return self._config

    def describe(self) -> str:
        return self.url


# ------------------------------------------------------------------------------------ DCP
class _RangeFile(S3RangeFile):
    """A seekable read-only S3 object (S3RangeFile's positioning): small reads are served from a
    read-ahead buffer kept inside the DCP item being read, large `readinto`s (a tensor's bytes)
    go straight into the caller's buffer, so no copy is kept."""

    def __init__(self, s3: S3Storage, url: str, size: int, read_ahead: int = 256 << 10,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(s3, url, size, min_request=read_ahead)
        self.s3 = s3
        self.read_ahead, self.chunk_bytes = read_ahead, chunk_bytes
        self.blocks: list[tuple[int, bytes]] = []      # a few recent read-ahead blocks (an item's head and tail)
        self.window = (0, size)       # the DCP item being read: read-ahead stays inside it

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self.length - self.pos))
        if n == 0:
            return 0
        lo, hi = self.pos, self.pos + n
        block = next(((b0, data) for b0, data in self.blocks if b0 <= lo and hi <= b0 + len(data)), None)
        if block is not None:
            view[:n] = block[1][lo - block[0]: hi - block[0]]
        elif n >= self.read_ahead:
            read_into(self.s3, self.url, lo, view[:n], self.chunk_bytes)
        else:       # a small read (zip headers of a DCP item): fetch a block around it, inside the item
            w_lo, w_hi = self.window if self.window[0] <= lo and hi <= self.window[1] else (0, self.length)
            end = min(w_hi, lo + self.read_ahead)
            begin = max(w_lo, min(lo, end - self.read_ahead))
            data = self.s3.read_range(self.url, begin, end)
            self.blocks = [*self.blocks[-3:], (begin, data)]
            view[:n] = data[lo - begin: hi - begin]
        self.pos = hi
        return n

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.length - self.pos
        buf = bytearray(max(0, min(n, self.length - self.pos)))
        got = self.readinto(buf)
        return bytes(buf[:got])


class _S3FileSystem:
    """The part of DCP's FileSystemBase that a reader uses, on S3 (paths are s3:// URLs)."""

    def __init__(self, s3: S3Storage, sizes: dict[str, int]) -> None:
        self.s3, self.sizes = s3, sizes

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "rb":
            raise CheckpointError(f"{path}: S3 checkpoints are read-only here")
        path = str(path)
        size = self.sizes.get(path)
        yield _RangeFile(self.s3, path, size if size is not None else self.s3.size(path))

    def concat_path(self, path, suffix: str) -> str:
        return _url(str(path), suffix)

    def init_path(self, path) -> str:
        return str(path)


def _s3_reader(url: str, s3: S3Storage, sizes: dict[str, int], metadata):
    """The safe DCP reader of safe_load, reading data files from S3; `metadata` is the DCP
    Metadata already read (safely, from the verified local copy of `.metadata`)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    base = safe_load._reader_class()

    class S3Reader(base):
        def __init__(self) -> None:
            super().__init__(url)
            self.fs = _S3FileSystem(s3, sizes)
            self.path = url

        def _slice_file(self, file, sinfo):
            file.window = (sinfo.offset, sinfo.offset + sinfo.length)
            return super()._slice_file(file, sinfo)

        def read_metadata(self, *args: Any, **kwargs: Any):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return S3Reader()


def resolve_dcp(s3: S3Storage, url: str) -> str | None:
    """A step folder URL for `url` (a step folder, a `checkpoints/` prefix holding `latest`, or a
    run prefix holding `checkpoints/latest`), or None when `url` holds no training checkpoint."""
    url = url.rstrip("/")
    if _exists(s3, _url(url, MANIFEST)) or _exists(s3, _url(url, ".metadata")):
        return url
    for base in (url, _url(url, "checkpoints")):
        latest = s3.get(_url(base, "latest"))
        if latest is not None:
            name = latest.decode().strip()
            if not re.fullmatch(r"step-\d{8,}", name):
                raise CheckpointError(f"{_url(base, 'latest')} names {name!r}, not a step folder")
            return _url(base, name)
    return None


class S3DCPSource(DCPSource):
    """The tensors under `prefix` ("model" or "ema") of a committed training checkpoint on S3."""

    def __init__(self, url: str, prefix: str = "model", verify: bool = True, storage: S3Storage | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.url = url.rstrip("/")
        self.s3 = storage or _storage()
        self.chunk_bytes = chunk_bytes
        local = Path(tempfile.mkdtemp(prefix="ecdit-s3-meta-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, local, True)
        self.manifest = self._fetch_small_files(local)
        self._metadata = None
        if verify:
            self.verify()
        super().__init__(local, prefix, verify=False)
        _OPEN.add(self)

    def _fetch_small_files(self, local: Path) -> dict[str, Any]:
        murl = _url(self.url, MANIFEST)
        raw = self.s3.get(murl)
        if raw is None:
            raise CheckpointError(f"{self.url}: no {MANIFEST} (the save or upload did not finish)")
        try:
            manifest = json.loads(raw)
            files = manifest["files"]
            assert isinstance(files, dict) and ".metadata" in files and META in files
        except Exception:
            raise CheckpointError(f"{murl} is unreadable or lists no DCP .metadata / {META}") from None
        listing = {o.path[len(self.url) + 1:]: o.size for o in self.s3.list(self.url + "/")}
        # S3Storage.list hides names starting with "."; the .metadata size comes from its own HEAD
        listing[".metadata"] = self.s3.size(_url(self.url, ".metadata")) if ".metadata" in files else 0
        self.sizes: dict[str, int] = {}
        for name, entry in files.items():
            if name != ".metadata":
                _check_name(murl, name)
            if name not in listing:
                raise CheckpointError(f"{self.url}: {name} is missing")
            if listing[name] != entry.get("size"):
                raise CheckpointError(f"{self.url}: {name} has {listing[name]} bytes, manifest says {entry.get('size')}")
            self.sizes[_url(self.url, name)] = listing[name]
        for name in (".metadata", META):     # small files: always checked, then kept locally
            data = self.s3.read_bytes(_url(self.url, name))
            if hashlib.sha256(data).hexdigest() != files[name].get("sha256"):
                raise CheckpointError(f"{self.url}: {name} does not match its sha256 in the manifest")
            (local / name).write_bytes(data)
        (local / MANIFEST).write_bytes(raw)
        return manifest

    def verify(self) -> int:
        """Stream every data file through sha256 and compare with the manifest; the number of files."""
        for name, entry in self.manifest["files"].items():
            if name in (".metadata", META):
                continue
            url = _url(self.url, name)
            if sha256_remote(self.s3, url, self.sizes[url]) != entry.get("sha256"):
                raise CheckpointError(f"{self.url}: {name} does not match its sha256 in the manifest")
        return len(self.manifest["files"])

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        import warnings

        import torch.distributed.checkpoint as dcp

        info = self.infos[name]
        target = out if out is not None else torch.empty(info.shape, dtype=info.dtype)
        key = f"{self.prefix}.{name}"
        state = {key: target}
        if self._metadata is None:
            self._metadata = safe_load.read_metadata(self.folder)
        reader = _s3_reader(self.url, self.s3, self.sizes, self._metadata)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            try:
                dcp.load(state, storage_reader=reader, planner=safe_load._planner())
            except Exception as e:       # DCP gathers per-rank failures; name the cause, not its traceback
                causes = getattr(e, "failures", None)
                cause = next(iter(causes.values())) if causes else e
                cause = cause[0] if isinstance(cause, tuple) else cause
                if isinstance(cause, (DataError, CheckpointError)):
                    raise type(cause)(str(cause)) from None
                raise CheckpointError(f"reading {key} from {self.url} failed: {type(cause).__name__}: {cause}") from None
        return state[key]

    def extents(self, name: str):
        return None               # no local file to copy from: read_into (ranged GETs through DCP)

    def read_config(self) -> dict[str, Any]:
        from ecdit_dist.checkpoint.manager import read_meta

        return read_meta(self.folder)["config"]

    def describe(self) -> str:
        return f"{self.url} ({self.prefix})"


def open_source(url: str, ema: bool = False, verify: bool = True):
    """An S3 training checkpoint (step folder or run prefix) or consolidated safetensors."""
    s3 = _storage()
    step = None if url.endswith(".safetensors") else resolve_dcp(s3, url)
    if step is not None:
        return S3DCPSource(step, "ema" if ema else "model", verify=verify, storage=s3)
    if ema:
        raise ConvertError(f"{url} is not a training checkpoint; --ema needs one")
    if not url.endswith(".safetensors") and not _exists(s3, _url(url, CONFIG_JSON)):
        listing = s3.list(url.rstrip("/") + "/")
        if not listing:
            raise ConvertError(f"{url} holds no checkpoint (no objects under it)")
    return S3SafetensorsSource(url, storage=s3)


def open_safetensors(path):
    """`SafetensorsSource` for a local path, `S3SafetensorsSource` for an s3:// URL."""
    if is_s3(str(path)):
        return S3SafetensorsSource(str(path))
    from ecdit_dist.checkpoint.tensors import SafetensorsSource

    return SafetensorsSource(path)


# ------------------------------------------------------------------------------------ outputs
def _keys(s3: S3Storage, url: str, limit: int | None = None) -> list[str]:
    """Every key under the folder `url` (hidden names included), all pages."""
    bucket, key = split_s3(url.rstrip("/") + "/")
    out, token = [], None
    while True:
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
        if limit:
            kw["MaxKeys"] = limit
        if token:
            kw["ContinuationToken"] = token
        page = s3._call(url, s3.client.list_objects_v2, **kw)
        out += [o["Key"] for o in page.get("Contents", [])]
        if limit and out or not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def check_out(url: str, overwrite: bool) -> None:
    """Refuse a non-empty destination prefix unless it is to be replaced (also checks that the
    bucket exists and the credentials may list it, before any work)."""
    s3 = _storage()
    if _keys(s3, url, limit=1) and not overwrite:
        state = ("a complete consolidated checkpoint" if _exists(s3, _url(url, CONFIG_JSON)) else
                 "no config.json: the remains of a conversion that did not finish")
        raise ConvertError(f"{url} is not empty ({state}); choose another --out, or pass --overwrite to "
                           f"replace it")


def _clear(s3: S3Storage, url: str) -> None:
    """Delete everything under `url`, config.json first (so the old output is unreadable from
    the first request on), and abort unfinished multipart uploads there."""
    bucket, prefix = split_s3(url.rstrip("/") + "/")
    cfg = _url(url, CONFIG_JSON)
    if _exists(s3, cfg):
        s3.delete(cfg)
    for key in _keys(s3, url):
        s3.delete(f"s3://{bucket}/{key}")
    try:
        page = s3.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        for up in page.get("Uploads", []):
            s3.client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    except Exception:      # best effort: not every S3-compatible server lists uploads
        pass


_ACTIVE: list["S3Output"] = []


def paced(tick: Callable[[int], Any] | None) -> Callable[[int], Any] | None:
    """The progress callback of a writer; while an S3 output is active it also holds the writer
    back when that output has `max_staged` finished shards waiting for upload."""
    if not _ACTIVE:
        return tick
    out = _ACTIVE[-1]

    def tick_paced(n: int) -> None:
        out.throttle()
        if tick is not None:
            tick(n)

    return tick_paced


def shard_gate() -> Callable[[], None] | None:
    """For a shard writer (streaming.write_shards): while an S3 output is active, block before each
    new shard until at most `max_staged` finished shards await upload; None otherwise."""
    return _ACTIVE[-1].throttle if _ACTIVE else None


class S3Output:
    """Stage a converter's output locally, upload shards as they finish, commit with config.json."""

    LAST = (INDEX, CONFIG_JSON)        # uploaded at the end, in this order

    def __init__(self, url: str, overwrite: bool = False, max_staged: int = 2, poll_s: float = 0.05) -> None:
        self.url = url.rstrip("/")
        self.overwrite = overwrite
        self.max_staged = max_staged
        self.poll_s = poll_s
        self.s3 = _storage()
        self.uploaded: list[str] = []
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.done = threading.Event()
        self.cancel = threading.Event()      # the conversion failed: upload nothing more
        self.staged_peak = 0

    def _finished(self) -> list[Path]:
        return sorted(p for p in self.stage.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.name not in self.LAST)

    def _upload(self, path: Path) -> None:
        dest = _url(self.url, path.name)
        self.uploaded.append(dest)        # before the request: a failed multipart may leave a part
        self.s3.put_file(path, dest)
        path.unlink()

    def _pump(self) -> None:
        try:
            while True:
                stop = self.done.is_set()
                finished = self._finished()
                self.staged_peak = max(self.staged_peak, len(finished))
                for p in finished:
                    if self.cancel.is_set():
                        return
                    self._upload(p)
                    with self.cond:
                        self.cond.notify_all()
                if stop:
                    return
                self.done.wait(self.poll_s)
        except BaseException as e:       # reported to the writer by throttle() and to the caller on exit
            self.error = e
            with self.cond:
                self.cond.notify_all()

    def throttle(self) -> None:
        with self.cond:
            while self.error is None and len(self._finished()) >= self.max_staged:
                self.cond.wait(1.0)
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Path:
        for src in list(_OPEN):
            if _overlaps(getattr(src, "folder_url", src.url), self.url):
                raise ConvertError(f"{self.url} is also an input ({src.url}); an S3 output cannot replace its own "
                                   f"input, write it to another prefix")
        check_out(self.url, self.overwrite)
        if self.overwrite:
            _clear(self.s3, self.url)
        self.stage = Path(tempfile.mkdtemp(prefix="ecdit-s3-out-"))
        self.thread = threading.Thread(target=self._pump, name="s3-upload", daemon=True)
        self.thread.start()
        _ACTIVE.append(self)
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> None:
        _ACTIVE.remove(self)
        if exc is not None:
            self.cancel.set()
        self.done.set()
        self.thread.join()
        try:
            if exc is None and self.error is not None:
                raise self.error
            if exc is None:
                for name in self.LAST:              # the index, then the commit marker
                    if (self.stage / name).exists():
                        self._upload(self.stage / name)
        except BaseException:
            self._abort()
            raise
        else:
            if exc is not None:
                self._abort()
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)

    def _abort(self) -> None:
        """Delete what this output uploaded (never config.json of an earlier output: it was
        deleted before the first upload, or the destination was empty)."""
        for dest in reversed(self.uploaded):
            with contextlib.suppress(Exception):
                self.s3.delete(dest)


@contextlib.contextmanager
def staged_upload(url: str, overwrite: bool = False, max_staged: int = 2):
    """`convert.staged_output` for an s3:// destination: yields the local staging folder."""
    with S3Output(url, overwrite, max_staged) as stage:
        yield stage


# ------------------------------------------------------------------------------------ inspect, import, deepspeed
def inspect(url: str, verify: bool = True, ema: bool = False) -> dict[str, Any]:
    """`convert.inspect` of an s3:// checkpoint (sha256 of every file of a training checkpoint)."""
    from ecdit_dist.checkpoint.convert import _arch
    from ecdit_dist.checkpoint.tensors import check_keys, expected_tensors, total_bytes

    src = open_source(url, ema=ema, verify=verify)
    report: dict[str, Any] = {"path": url, "kind": "training" if isinstance(src, DCPSource) else "safetensors"}
    if isinstance(src, S3DCPSource):
        from ecdit_dist.checkpoint.manager import read_meta

        if verify:
            report["verified_files"] = len(src.manifest["files"])
        meta = read_meta(src.folder)
        report["step"], report["layout"] = meta.get("step"), meta.get("layout")
    report["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                         for k, v in src.infos.items()}
    report["total_params"] = sum(math.prod(v.shape) for v in src.infos.values())
    report["total_bytes"] = total_bytes(src.infos.values())
    try:
        model, moe = _arch(src.read_config())
        check_keys(src.infos, expected_tensors(model, moe), src.describe())
        report["matches_config"] = True
    except ConvertError as e:
        report["matches_config"] = str(e)
    return report


def import_to_s3(run_url: str, dry_run: bool, run_import: Callable[[Path, bool], dict[str, Any]]) -> dict[str, Any]:
    """`convert import --run-dir s3://...`: the step-0 checkpoint is written into a local
    temporary run folder by `run_import(folder, dry_run)`, then uploaded in the layout that
    `checkpoint.mirror` uses (`<prefix>/checkpoints/step-00000000/`: data files first, the
    manifest last, then `checkpoints/latest`). Needs local disk for the checkpoint (weights
    and their fp32 EMA) while it runs."""
    from ecdit_dist.checkpoint.manager import read_manifest, step_dir_name

    s3 = _storage()
    base = _url(run_url, "checkpoints")
    remote = _url(base, step_dir_name(0))
    if _keys(s3, base, limit=1):
        raise ConvertError(f"{base} already holds checkpoints; import into an empty prefix")
    with tempfile.TemporaryDirectory(prefix="ecdit-s3-import-") as tmp:
        plan = run_import(Path(tmp), dry_run)
        if dry_run:
            return {**plan, "out": remote}
        folder = Path(tmp) / "checkpoints" / step_dir_name(0)
        manifest = read_manifest(folder)
        uploaded: list[str] = []
        try:
            for name, entry in manifest["files"].items():
                uploaded.append(_url(remote, name))
                s3.put_file(folder / name, uploaded[-1], entry["sha256"])
            uploaded.append(_url(remote, MANIFEST))
            s3.put_file(folder / MANIFEST, uploaded[-1])
            s3.put_bytes(_url(base, "latest"), (folder.name + "\n").encode())
        except BaseException:
            for dest in reversed(uploaded):
                with contextlib.suppress(Exception):
                    s3.delete(dest)
            raise
    return {**plan, "out": remote}


@contextlib.contextmanager
def local_copy(url: str):
    """A whole S3 folder downloaded into a temporary local folder (for readers that need files,
    e.g. DeepSpeed's, which load the whole model anyway)."""
    s3 = _storage()
    bucket, prefix = split_s3(url.rstrip("/") + "/")
    names = [k[len(prefix):] for k in _keys(s3, url)]
    if not names:
        raise ConvertError(f"{url} holds no objects")
    with tempfile.TemporaryDirectory(prefix="ecdit-s3-in-") as tmp:
        for rel in names:
            if not rel or rel.startswith("/") or "\\" in rel or ".." in rel.split("/"):
                raise CheckpointError(f"{url} holds an object outside a plain folder layout: {rel!r}")
            target = Path(tmp) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.get_file(f"s3://{bucket}/{prefix}{rel}", target)
        yield Path(tmp)
