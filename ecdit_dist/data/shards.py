"""Parquet shards of latents and captions: the format, the dataset index and random access.

Schema (checked when a shard is opened; docs/DATA.md):

    id        int64     stable sample id
    latent    binary    C*H*W values of `latent_dtype` (float16 or bfloat16), row-major
    caption   string
    token_ids list<int32>   optional
    text_emb  binary    optional: text_len * text_dim float16 values (padding rows are zero)
    text_len  int32     optional, with text_emb: number of real text tokens

File metadata, key "ecdit" (JSON): format, latent_shape, latent_dtype, latent_scale, and for
text_emb: text_encoder, text_dim, text_len. Row groups are the unit of reading (one ranged
request per column chunk) and of shuffling.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ecdit_dist.data.storage import DataError, ObjectInfo, folder_prefix, storage_for

META_KEY = b"ecdit"
FORMAT = 1
LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REQUIRED = {"id": "int64", "latent": "binary", "caption": "string"}


def shard_schema(meta: dict[str, Any], with_tokens: bool = False, with_text: bool = False):
    import pyarrow as pa

    fields = [pa.field("id", pa.int64()), pa.field("latent", pa.binary()), pa.field("caption", pa.string())]
    if with_tokens:
        fields.append(pa.field("token_ids", pa.list_(pa.int32())))
    if with_text:
        fields += [pa.field("text_emb", pa.binary()), pa.field("text_len", pa.int32())]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})


def check_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    if meta.get("format") != FORMAT:
        raise DataError(f"{where}: unsupported shard format {meta.get('format')!r} (expected {FORMAT})")
    shape = meta.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise DataError(f"{where}: metadata latent_shape must be [C, H, W], got {shape!r}")
    if meta.get("latent_dtype") not in LATENT_DTYPES:
        raise DataError(f"{where}: metadata latent_dtype must be one of {list(LATENT_DTYPES)}, "
                        f"got {meta.get('latent_dtype')!r}")
    if not isinstance(meta.get("latent_scale", 1.0), (int, float)):
        raise DataError(f"{where}: metadata latent_scale must be a number")
    return meta


def check_schema(schema, where: str) -> dict[str, Any]:
    """The shard's metadata, after checking columns, types and metadata."""
    import pyarrow as pa

    names = set(schema.names)
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise DataError(f"{where}: wrong schema, missing column(s) {missing} (have {sorted(names)})")
    types = {"int64": pa.int64(), "binary": pa.binary(), "string": pa.string()}
    for col, t in REQUIRED.items():
        got = schema.field(col).type
        if got != types[t] and not (t == "binary" and got == pa.large_binary()) and \
                not (t == "string" and got == pa.large_string()):
            raise DataError(f"{where}: wrong schema, column {col!r} is {got}, expected {t}")
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise DataError(f"{where}: wrong schema, no 'ecdit' file metadata (latent shape, dtype, scale)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise DataError(f"{where}: the 'ecdit' file metadata is not JSON") from None
    meta = check_meta(meta, where)
    if "text_emb" in names:
        for k in ("text_dim", "text_len", "text_encoder"):
            if k not in meta:
                raise DataError(f"{where}: text_emb column without metadata {k!r}")
        if "text_len" not in names:
            raise DataError(f"{where}: text_emb column without text_len column")
    return meta


@dataclass
class ShardInfo:
    path: str
    size: int
    row_groups: list[int]
    meta: dict[str, Any]
    columns: list[str]
    sha256: str | None = None     # of the whole file, when known (from the dataset index)

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


def read_footer(storage, obj: ObjectInfo) -> ShardInfo:
    import pyarrow.parquet as pq

    try:
        with storage.open(obj.path, obj.size) as f:
            md = pq.ParquetFile(f).metadata
    except DataError:
        raise
    except Exception as e:  # pyarrow: truncated file, bad magic, corrupt footer
        raise DataError(f"{obj.path}: not a readable Parquet shard ({type(e).__name__}: {e})") from None
    schema = md.schema.to_arrow_schema()
    meta = check_schema(schema, obj.path)
    return ShardInfo(obj.path, obj.size, [md.row_group(i).num_rows for i in range(md.num_row_groups)],
                     meta, list(schema.names))


@dataclass
class DatasetIndex:
    """Every readable shard under a path (sorted), its row groups, and what was skipped."""

    root: str
    shards: list[ShardInfo]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = "footers"       # "footers" (every shard's footer read) or the dataset index's URL

    @classmethod
    def build(cls, root: str, on_error: str = "raise", retries: int = 5, workers: int = 8) -> "DatasetIndex":
        storage = storage_for(root, retries)
        objects = storage.list(folder_prefix(root), ".parquet")
        if not objects:
            raise DataError(f"{root}: no *.parquet shards found")
        results: list[ShardInfo | DataError] = [None] * len(objects)  # type: ignore[list-item]

        def one(i: int) -> None:
            try:
                results[i] = read_footer(storage, objects[i])
            except DataError as e:
                results[i] = e

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(len(objects))))
        shards, skipped = [], []
        for obj, r in zip(objects, results):
            if isinstance(r, DataError):
                if on_error != "skip":
                    raise DataError(f"{r} (set data.on_error=skip to train without this shard)")
                skipped.append((obj.path, str(r)))
            elif r.rows:
                shards.append(r)
        if not shards:
            raise DataError(f"{root}: no readable shard ({len(skipped)} skipped)")
        first = shards[0].meta
        for s in shards[1:]:
            for k in ("latent_shape", "latent_dtype", "latent_scale", "text_dim", "text_len", "text_encoder"):
                if s.meta.get(k) != first.get(k):
                    raise DataError(f"{s.path}: metadata {k}={s.meta.get(k)!r} differs from {shards[0].path} "
                                    f"({first.get(k)!r}); all shards of a dataset must agree")
        return cls(root, shards, skipped)

    @property
    def meta(self) -> dict[str, Any]:
        return self.shards[0].meta

    @property
    def num_samples(self) -> int:
        return sum(s.rows for s in self.shards)

    def blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row group) of every block, in dataset order, as two int64 arrays."""
        counts = np.array([len(s.row_groups) for s in self.shards], dtype=np.int64)
        shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int64), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return shard_of, np.arange(int(counts.sum()), dtype=np.int64) - first[shard_of]

    def block_sizes(self) -> np.ndarray:
        return np.fromiter((n for s in self.shards for n in s.row_groups), dtype=np.int64)

    def name(self, shard: ShardInfo) -> str:
        """The shard's path relative to the dataset root (the same for a local copy and an S3 copy)."""
        root = self.root.rstrip("/")
        rel = shard.path[len(root):].lstrip("/\\") if shard.path.startswith(root) else shard.path
        return rel.replace("\\", "/") or shard.path.rsplit("/", 1)[-1]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{self.name(s)}:{s.size}:{s.row_groups}\n".encode())
        return h.hexdigest()[:16]

    def has_text(self) -> bool:
        return all("text_emb" in s.columns for s in self.shards)


@dataclass
class Block:
    ids: torch.Tensor             # (n,)
    latents: torch.Tensor         # (n, C, H, W) float32, scaled
    captions: list[str]
    text: torch.Tensor | None     # (n, L, D) float32
    text_len: torch.Tensor | None  # (n,)


class ParquetSource:
    """Random access to samples by dataset index, one cached row group at a time."""

    def __init__(self, index: DatasetIndex, retries: int = 5, cache_blocks: int = 64, want_text: bool = False,
                 read_threads: int = 8) -> None:
        self.index = index
        self.storage = storage_for(index.root, retries)
        self.meta = index.meta
        self.latent_shape = tuple(self.meta["latent_shape"])
        self.latent_dtype = LATENT_DTYPES[self.meta["latent_dtype"]]
        self.scale = float(self.meta.get("latent_scale", 1.0))
        self.want_text = want_text
        self.block_shard, self.block_rg = index.blocks()          # (blocks,) int64 each
        sizes = index.block_sizes()
        self.block_start = np.concatenate([[0], np.cumsum(sizes)])
        self.cache: OrderedDict[int, Block] = OrderedDict()
        self.cache_blocks = cache_blocks
        self.lock = threading.Lock()
        self.footers: dict[int, Any] = {}          # parsed Parquet footers, read once per shard
        self.pool = ThreadPoolExecutor(read_threads, thread_name_prefix="shard-read")

    def __len__(self) -> int:
        return int(self.block_start[-1])

    def block_sizes(self) -> np.ndarray:
        return np.diff(self.block_start)

    def read_block(self, b: int) -> Block:
        import pyarrow.parquet as pq

        with self.lock:
            if b in self.cache:
                self.cache.move_to_end(b)
                return self.cache[b]
        shard_no, rg = int(self.block_shard[b]), int(self.block_rg[b])
        shard = self.index.shards[shard_no]
        cols = ["id", "latent", "caption"] + (["text_emb", "text_len"] if self.want_text else [])
        try:
            with self.storage.open(shard.path, shard.size) as f:
                pf = pq.ParquetFile(f, metadata=self.footers.get(shard_no))
                if shard_no not in self.footers:                  # first open: the footer must match the index
                    self._check_footer(shard, pf.metadata)
                    self.footers[shard_no] = pf.metadata
                table = pf.read_row_group(rg, columns=cols)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{shard.path}: row group {rg} is unreadable ({type(e).__name__}: {e})") from None
        block = self._decode(table, shard.path)
        with self.lock:
            self.cache[b] = block
            while len(self.cache) > self.cache_blocks:
                self.cache.popitem(last=False)
        return block

    def _check_footer(self, shard: ShardInfo, md) -> None:
        got = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        if got != list(shard.row_groups):
            raise DataError(f"{shard.path}: the shard changed after the dataset was indexed ({self.index.source}): "
                            f"row groups {got[:8]} vs {list(shard.row_groups)[:8]} in the index; re-run "
                            f"`ecdit data index {self.index.root}`")

    @staticmethod
    def _fixed_rows(table, column: str, n: int, per: int, where: str) -> torch.Tensor:
        """A binary column whose rows all hold `per` bytes -> (n, per) uint8, without per-row objects."""
        col = table.column(column).combine_chunks()
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int64 if "large" in str(col.type) else np.int32)
        offsets = offsets[col.offset: col.offset + n + 1]
        sizes = np.diff(offsets)
        if col.null_count or (sizes != per).any():
            row = int(np.argmax(sizes != per)) if (sizes != per).any() else 0
            raise DataError(f"{where}: {column} of row {row} has {int(sizes[row])} bytes, expected {per}")
        data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
        return torch.from_numpy(data.copy()).view(n, per)

    def _decode(self, table, where: str) -> Block:
        n = table.num_rows
        per = math.prod(self.latent_shape) * torch.empty((), dtype=self.latent_dtype).element_size()
        raw = self._fixed_rows(table, "latent", n, per, where)
        lat = raw.view(self.latent_dtype).view(n, *self.latent_shape).float() * self.scale
        text = text_len = None
        if self.want_text:
            L, D = self.meta["text_len"], self.meta["text_dim"]
            text = self._fixed_rows(table, "text_emb", n, L * D * 2, where).view(torch.float16).view(n, L, D).float()
            text_len = torch.from_numpy(table.column("text_len").to_numpy().astype(np.int64))
        return Block(ids=torch.from_numpy(table.column("id").to_numpy().astype(np.int64)), latents=lat,
                     captions=table.column("caption").to_pylist(), text=text, text_len=text_len)

    def batch(self, indices) -> dict[str, Any]:
        """Samples by dataset index -> ids, latents, captions (+ precomputed text)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index outside the dataset of {len(self)}")
        blocks = np.searchsorted(self.block_start, indices, side="right") - 1
        rows = indices - self.block_start[blocks]
        unique = np.unique(blocks).tolist()
        loaded = dict(zip(unique, self.pool.map(self.read_block, unique)))   # the batch's row groups, in parallel
        n = len(indices)
        first = loaded[unique[0]]
        ids = torch.empty(n, dtype=torch.long)
        latents = torch.empty((n, *first.latents.shape[1:]))
        captions: list[str] = [""] * n
        text = torch.empty((n, *first.text.shape[1:])) if self.want_text else None
        text_len = torch.empty(n, dtype=torch.long) if self.want_text else None
        for b in unique:
            sel = np.nonzero(blocks == b)[0]
            r = torch.from_numpy(rows[sel])
            at = torch.from_numpy(sel)
            blk = loaded[b]
            ids[at] = blk.ids[r]
            latents[at] = blk.latents[r]
            for i, j in zip(sel.tolist(), rows[sel].tolist()):
                captions[i] = blk.captions[j]
            if self.want_text:
                text[at] = blk.text[r]
                text_len[at] = blk.text_len[r]
        res = {"ids": ids, "latents": latents, "captions": captions}
        if self.want_text:
            res["text"] = text
            res["text_mask"] = torch.arange(text.shape[1])[None] < text_len[:, None]
        return res
