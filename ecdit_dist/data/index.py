"""The dataset index: one object beside the shards that says what they hold.

`<root>/ecdit-index.json` lists every shard (its path relative to the root, size in bytes,
rows per row group and sha256), the dataset's schema and metadata, and a fingerprint.
Training reads this one object instead of the footer of every shard: one request at start,
made by one rank, whose result is broadcast to the others. Before trusting it, the index is
checked against a listing of the root (names and sizes: one request per 1,000 shards), unless
`data.index=trust`; a shard that is missing or of another size is an error naming it (or is
left out under `data.on_error=skip`). When a shard is first opened its footer is checked
against its row groups in the index. Without an index the old way still works: every
footer is read (with a warning saying how to write an index).

The file is written atomically (a temporary name, then a rename; on S3 one PUT, after the
shards), by `ecdit data synth / encode / upload / index`.
"""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ecdit_dist.data.shards import DatasetIndex, ShardInfo, check_meta
from ecdit_dist.data.storage import DataError, S3Storage, folder_prefix, is_s3, join, sha256_of, storage_for

INDEX_NAME = "ecdit-index.json"
INDEX_FORMAT = "ecdit-dataset-index"
INDEX_VERSION = 1
INDEX_MODES = ("verify", "trust", "scan")


def index_url(root: str) -> str:
    return join(root, INDEX_NAME)


# ------------------------------------------------------------------------------------ writing
def _schema_of(shard: ShardInfo, storage) -> list[list[str]]:
    import pyarrow.parquet as pq

    with storage.open(shard.path, shard.size) as f:
        schema = pq.ParquetFile(f).schema_arrow
    return [[n, str(schema.field(n).type)] for n in schema.names]


def to_document(index: DatasetIndex, checksums: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The JSON document of a dataset index (paths relative to its root)."""
    first = index.shards[0]
    storage = storage_for(index.root)
    shards = []
    for s in index.shards:
        entry: dict[str, Any] = {"name": index.name(s), "size": s.size, "row_groups": list(s.row_groups),
                                 "sha256": (checksums or {}).get(s.path, s.sha256)}
        if s.columns != first.columns:
            entry["columns"] = s.columns
        if s.meta != first.meta:
            entry["meta"] = s.meta
        shards.append(entry)
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime()),
            "samples": index.num_samples, "fingerprint": index.fingerprint(), "meta": first.meta,
            "columns": first.columns, "schema": _schema_of(first, storage), "shards": shards}


def write(index: DatasetIndex, checksums: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Write `<root>/ecdit-index.json` atomically; returns the document. Without `checksums` every
    shard is checksummed (see checksums_of)."""
    doc = to_document(index, checksums_of(index) if checksums is None else checksums)
    data = json.dumps(doc, separators=(",", ":")).encode()
    storage_for(index.root).put_bytes(index_url(index.root), data)
    return doc


def checksums_of(index: DatasetIndex, workers: int = 8, progress: Callable[[int], Any] | None = None
                 ) -> dict[str, str | None]:
    """sha256 of every shard: hashed locally; on S3 the one recorded at upload (object metadata),
    else hashed by reading the object."""
    storage = storage_for(index.root)

    def one(s: ShardInfo) -> str | None:
        if not is_s3(s.path):
            digest = sha256_of(s.path)
        else:
            assert isinstance(storage, S3Storage)
            digest = storage.head(s.path).get("Metadata", {}).get("sha256")
            if digest is None:
                import hashlib

                h = hashlib.sha256()
                for start in range(0, s.size, 64 << 20):
                    h.update(storage.read_range(s.path, start, min(s.size, start + (64 << 20))))
                digest = h.hexdigest()
        if progress:
            progress(1)
        return digest

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip((s.path for s in index.shards), pool.map(one, index.shards)))


def build_and_write(root: str, on_error: str = "raise", progress: Callable[[int], Any] | None = None
                    ) -> dict[str, Any]:
    """`ecdit data index ROOT`: read every footer and checksum, then write the index."""
    index = DatasetIndex.build(root, on_error=on_error)
    doc = write(index, checksums_of(index, progress=progress))
    return {"index": index_url(root), "shards": len(doc["shards"]), "samples": doc["samples"],
            "fingerprint": doc["fingerprint"], "skipped": [{"path": p, "reason": r} for p, r in index.skipped]}


# ------------------------------------------------------------------------------------ reading
def from_document(root: str, doc: Any, where: str) -> DatasetIndex:
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise DataError(f"{where}: not an ecdit dataset index (format {found!r}, expected {INDEX_FORMAT!r})")
    if doc.get("version") != INDEX_VERSION:
        raise DataError(f"{where}: dataset index version {doc.get('version')!r}, this ecdit reads version "
                        f"{INDEX_VERSION}; re-run `ecdit data index {root}`")
    try:
        meta = check_meta(doc["meta"], where)
        columns = list(doc["columns"])
        shards = [ShardInfo(join(root, e["name"]), int(e["size"]), [int(n) for n in e["row_groups"]],
                            e.get("meta", meta), e.get("columns", columns), e.get("sha256"))
                  for e in doc["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: malformed dataset index ({type(e).__name__}: {e}); re-run "
                        f"`ecdit data index {root}`") from None
    if not shards:
        raise DataError(f"{where}: the dataset index lists no shards")
    return DatasetIndex(root, shards, source=where)


def check_listing(index: DatasetIndex, on_error: str) -> DatasetIndex:
    """Compare the index with a listing of its root (names and sizes): stale shards are an error
    naming them, or are left out under on_error=skip. Shards the index does not know are ignored
    with a warning."""
    listed = {o.path: o.size for o in storage_for(index.root).list(folder_prefix(index.root), ".parquet")}
    keep, skipped = [], list(index.skipped)
    for s in index.shards:
        size = listed.pop(s.path, None)
        problem = ("deleted after the dataset was indexed" if size is None else
                   f"{size} bytes, the index says {s.size} (replaced after the dataset was indexed)"
                   if size != s.size else None)
        if problem is None:
            keep.append(s)
        elif on_error == "skip":
            skipped.append((s.path, f"stale dataset index: {problem}"))
        else:
            raise DataError(f"{s.path}: {problem}; the dataset index {index.source} is stale: re-run "
                            f"`ecdit data index {index.root}` (or set data.on_error=skip to train without this shard)")
    if listed:
        warnings.warn(f"{index.root}: {len(listed)} shard(s) not in the dataset index are not used "
                      f"(e.g. {sorted(listed)[0]}); re-run `ecdit data index {index.root}` to include them",
                      stacklevel=2)
    if not keep:
        raise DataError(f"{index.root}: no shard of the dataset index is readable ({len(skipped)} skipped)")
    return DatasetIndex(index.root, keep, skipped, index.source)


def _read(root: str, retries: int, mode: str) -> tuple[bytes, str] | None:
    """The raw index and its URL, or None (no index, or mode="scan")."""
    if mode not in INDEX_MODES:
        raise DataError(f"unknown dataset index mode {mode!r}; use one of {INDEX_MODES}")
    if mode == "scan":
        return None
    url = index_url(root)
    raw = storage_for(root, retries).get(url)
    if raw is None:
        warnings.warn(f"{root}: no dataset index ({INDEX_NAME}); reading the footer of every shard (one request "
                      f"per shard); write one with `ecdit data index {root}`", stacklevel=3)
        return None
    return raw, url


def _parse(root: str, raw: bytes, url: str) -> DatasetIndex:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise DataError(f"{url}: the dataset index is not JSON; re-run `ecdit data index {root}`") from None
    return from_document(root, doc, url)


def _without(index: DatasetIndex, skipped: list[tuple[str, str]]) -> DatasetIndex:
    gone = {p for p, _ in skipped}
    return DatasetIndex(index.root, [s for s in index.shards if s.path not in gone], list(skipped), index.source)


def open_dataset(root: str, on_error: str = "raise", retries: int = 5, mode: str = "verify") -> DatasetIndex:
    """The dataset under `root`: from its index (checked against the listing unless mode="trust"),
    or, without one or with mode="scan", from every shard's footer."""
    found = _read(root, retries, mode)
    if found is None:
        return DatasetIndex.build(root, on_error=on_error, retries=retries)
    index = _parse(root, *found)
    return index if mode == "trust" else check_listing(index, on_error)


def open_dataset_once(root: str, on_error: str = "raise", retries: int = 5, mode: str = "verify") -> DatasetIndex:
    """open_dataset() with the requests made by rank 0 only, so start-up costs the same requests on
    1 rank as on 1,000. Rank 0 broadcasts the raw index and the shards the listing found stale
    (each rank parses the index itself: bytes broadcast faster than 300k pickled objects), or,
    without an index, the footer scan's result; or the error, which every rank then raises."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return open_dataset(root, on_error, retries, mode)
    payload: list[Any] = [None]
    index = None
    if dist.get_rank() == 0:
        try:
            found = _read(root, retries, mode)
            if found is None:
                index = DatasetIndex.build(root, on_error=on_error, retries=retries)
                payload[0] = ("dataset", index)
            else:
                index = _parse(root, *found)
                if mode != "trust":
                    index = check_listing(index, on_error)
                payload[0] = ("index", (found, index.skipped))
        except Exception as e:   # every rank must leave the broadcast; they all raise rank 0's error
            payload[0] = ("error", str(e) if isinstance(e, DataError) else f"{root}: {type(e).__name__}: {e}")
    dist.broadcast_object_list(payload, src=0)
    kind, body = payload[0]
    if kind == "error":
        raise DataError(body)
    if index is not None:
        return index
    if kind == "dataset":
        return body
    (raw, url), skipped = body
    return _without(_parse(root, raw, url), skipped)
