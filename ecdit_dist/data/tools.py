"""`ecdit data` operations: synth, encode, index, stats, upload, verify."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ecdit_dist.data.shards import FORMAT, DatasetIndex, shard_schema
from ecdit_dist.data import index as dataset_index
from ecdit_dist.data.storage import DataError, S3Storage, folder_prefix, is_s3, join, sha256_of, split_s3

Progress = Callable[[int], None] | None


def _write_table(table, path: Path, row_group: int, compression: str = "zstd") -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=row_group, compression=compression)
    os.replace(tmp, path)


def synth(out: str | Path, num_samples: int, latent_size: int = 16, shard_rows: int = 1024, row_group: int = 128,
          seed: int = 0, dtype: str = "float16", progress: Progress = None,
          compression: str = "zstd") -> dict[str, Any]:
    """The embedded shapes dataset as Parquet shards (ids 0..num_samples-1)."""
    import pyarrow as pa

    from ecdit_dist.data.shapes import ShapesSource

    if num_samples <= 0 or shard_rows <= 0 or row_group <= 0:
        raise DataError("--num, --shard-rows and --row-group must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = ShapesSource(num_samples, 2 * latent_size, seed)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    meta = {"format": FORMAT, "latent_shape": list(source.latent_shape), "latent_dtype": dtype,
            "latent_scale": 1.0, "source": f"ecdit-dist shapes, seed {seed}",
            # the toy VAE's normalisation, so samples of a model trained on these shards can be decoded
            "toy_vae": {"mean": source.vae.mean.tolist(), "std": source.vae.std.tolist()}}
    schema = shard_schema(meta)
    files = []
    for start in range(0, num_samples, shard_rows):
        ids = list(range(start, min(num_samples, start + shard_rows)))
        latents, captions = source.batch(ids)
        raw = [bytes(x.to(torch_dtype).contiguous().view(torch.uint8).numpy()) for x in latents]
        table = pa.table({"id": pa.array(ids, pa.int64()), "latent": pa.array(raw, pa.binary()),
                          "caption": pa.array(captions, pa.string())}, schema=schema)
        path = out / f"shard-{start // shard_rows:05d}.parquet"
        _write_table(table, path, row_group, compression)
        files.append(path.name)
        if progress:
            progress(len(ids))
    doc = dataset_index.write(DatasetIndex.build(str(out)))
    return {"out": str(out), "shards": len(files), "samples": num_samples, "latent_shape": meta["latent_shape"],
            "index": dataset_index.index_url(str(out)), "fingerprint": doc["fingerprint"]}


def encode(path: str | Path, encoder, batch_size: int = 64, progress: Progress = None) -> dict[str, Any]:
    """Add text_emb / text_len columns (float16) to every shard of a local folder, in place
    (each file rewritten under a temporary name, then renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if is_s3(str(path)):
        raise DataError("ecdit data encode works on a local folder; encode, then `ecdit data upload`")
    index = DatasetIndex.build(str(path))
    L, D = encoder.max_len, encoder.dim
    for shard in index.shards:
        pf = pq.ParquetFile(shard.path)
        table = pf.read()
        captions = table.column("caption").to_pylist()
        embs, lens = [], []
        for i in range(0, len(captions), batch_size):
            emb, mask = encoder.encode(captions[i:i + batch_size])          # (b, L, D), (b, L)
            emb = emb.float() * mask[..., None]
            embs += [bytes(e.to(torch.float16).contiguous().view(torch.uint8).numpy()) for e in emb.cpu()]
            lens += mask.sum(dim=1).tolist()
        for name in ("text_emb", "text_len"):
            if name in table.column_names:
                table = table.drop(name)
        meta = {**shard.meta, "text_encoder": getattr(encoder, "name", type(encoder).__name__), "text_dim": D,
                "text_len": L}
        schema = shard_schema(meta, with_tokens="token_ids" in table.column_names, with_text=True)
        table = table.append_column("text_emb", pa.array(embs, pa.binary()))
        table = table.append_column("text_len", pa.array(lens, pa.int32()))
        table = table.select(schema.names).cast(schema)
        rows_per_group = pf.metadata.row_group(0).num_rows if pf.metadata.num_row_groups else 128
        _write_table(table, Path(shard.path), rows_per_group)
        if progress:
            progress(len(captions))
    dataset_index.write(DatasetIndex.build(str(path)))                   # the shards changed: index them again
    return {"path": str(path), "shards": len(index.shards), "samples": index.num_samples, "text_dim": D,
            "text_len": L, "index": dataset_index.index_url(str(path))}


def index(path: str, on_error: str = "raise", progress: Progress = None) -> dict[str, Any]:
    """Write the dataset index of an existing shard set (local or S3)."""
    return dataset_index.build_and_write(path, on_error, progress)


def stats(path: str, on_error: str = "raise") -> dict[str, Any]:
    index = dataset_index.open_dataset(path, on_error=on_error)
    sizes = index.block_sizes()
    return {
        "path": path, "shards": len(index.shards), "samples": index.num_samples,
        "bytes": sum(s.size for s in index.shards), "row_groups": int(sizes.size),
        "rows_per_row_group": {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean())},
        "columns": index.shards[0].columns, "metadata": index.meta, "fingerprint": index.fingerprint(),
        "skipped": [{"path": p, "reason": r} for p, r in index.skipped], "source": index.source,
    }


def upload(src: str | Path, dest: str, progress: Progress = None) -> dict[str, Any]:
    """Upload a local folder to s3://bucket/prefix (multipart for big files; sha256 in the object
    metadata), then verify every object against the local file."""
    if not is_s3(dest):
        raise DataError(f"{dest!r}: the destination must be s3://bucket/prefix")
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: no such folder")
    s3 = S3Storage()
    if not (src / dataset_index.INDEX_NAME).exists() and any(src.rglob("*.parquet")):
        dataset_index.write(DatasetIndex.build(str(src)))            # index a shard set that has none yet
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    # the index goes last: a reader never sees an index naming shards that are not there yet
    files.sort(key=lambda p: p.relative_to(src).as_posix() == dataset_index.INDEX_NAME)
    for p in files:
        s3.put_file(p, join(dest, p.relative_to(src).as_posix()), sha256_of(p))
        if progress:
            progress(p.stat().st_size)
    result = verify(dest, src)
    return {**result, "uploaded": len(files)}


def verify(url: str, local: str | Path | None = None, deep: bool = False) -> dict[str, Any]:
    """Check objects under s3://… : against a local folder (size + sha256), or on their own
    (sha256 recorded at upload; with deep=True re-hashed by reading them back)."""
    s3 = S3Storage()
    objects = s3.list(folder_prefix(url))
    problems: list[str] = []
    if local is not None:
        local = Path(local)
        want = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*"))
                if p.is_file() and not p.name.startswith(".")}
        bucket, prefix = split_s3(url)
        have = {o.path[len(f"s3://{bucket}/{prefix}"):].lstrip("/"): o for o in objects}
        for name, p in want.items():
            o = have.get(name)
            if o is None:
                problems.append(f"{join(url, name)}: missing")
                continue
            if o.size != p.stat().st_size:
                problems.append(f"{o.path}: {o.size} bytes, local {p.stat().st_size}")
                continue
            recorded = s3.head(o.path).get("Metadata", {}).get("sha256")
            if recorded != sha256_of(p):
                problems.append(f"{o.path}: sha256 differs from {p}")
    for o in objects if local is None else []:
        recorded = s3.head(o.path).get("Metadata", {}).get("sha256")
        if recorded is None:
            problems.append(f"{o.path}: no sha256 recorded (not uploaded by ecdit)")
        elif deep:
            h = hashlib.sha256()
            for start in range(0, o.size, 64 << 20):
                h.update(s3.read_range(o.path, start, min(o.size, start + (64 << 20))))
            if h.hexdigest() != recorded:
                problems.append(f"{o.path}: content does not match its recorded sha256")
    if problems:
        raise DataError("verification failed: " + "; ".join(problems[:10]) +
                        (f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""))
    return {"url": url, "objects": len(objects), "verified": True}


__all__ = ["synth", "encode", "index", "stats", "upload", "verify"]
