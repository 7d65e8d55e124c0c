"""Data start-up time and S3 requests against the number of shards and of ranks, with and without
the dataset index.

    python benchmarks/data_startup.py                        # SeaweedFS `weed mini` on 127.0.0.1, started here
    python benchmarks/data_startup.py --shards 100 1000 --ranks 1 2 --json out.json

Tiny shards (4 rows each, about 2 KB) are uploaded under one prefix per shard count, with
their dataset index. Start-up is what a training job does before its first step: open the
dataset (`open_dataset_once`) and build the ParquetSource, measured from after the process
group exists (modules imported, one boto3 client made) to a barrier after it, on spawned gloo
ranks. Requests are counted per rank with botocore event hooks. Modes:

    index    the index is read by rank 0, checked against a listing, and broadcast (data.index=verify)
    trust    the index is read by rank 0 and broadcast, no listing (data.index=trust)
    scan     no index: rank 0 lists and reads every footer, then broadcasts (data.index=scan)
    per-rank every rank lists and reads every footer (how start-up worked before the index)

The shard sweep runs on 1 rank; the rank sweep on --rank-shards shards.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ecdit-startup"


def tiny_shard() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ecdit_dist.data.shards import FORMAT, shard_schema

    meta = {"format": FORMAT, "latent_shape": [4, 2, 2], "latent_dtype": "float16", "latent_scale": 1.0}
    schema = shard_schema(meta)
    table = pa.table({"id": pa.array(range(4), pa.int64()), "latent": pa.array([bytes(32)] * 4, pa.binary()),
                      "caption": pa.array(["a tiny shard"] * 4, pa.string())}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    return buf.getvalue()


def populate(prefix: str, n: int, data: bytes, threads: int = 16) -> None:
    """n copies of one tiny shard under prefix, then its dataset index (written last)."""
    import hashlib

    from ecdit_dist.data import index as dataset_index
    from ecdit_dist.data.shards import DatasetIndex, ShardInfo, read_footer
    from ecdit_dist.data.storage import ObjectInfo, S3Storage

    s3 = S3Storage()
    paths = [f"{prefix}/shard-{i:06d}.parquet" for i in range(n)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: s3.put_bytes(p, data), paths))
    info = read_footer(s3, ObjectInfo(paths[0], len(data)))
    shards = [ShardInfo(p, len(data), info.row_groups, info.meta, info.columns) for p in paths]
    digest = hashlib.sha256(data).hexdigest()
    dataset_index.write(DatasetIndex(prefix, shards), {p: digest for p in paths})


def start_rank(rank: int, world: int, root: str, mode: str) -> dict:
    import collections
    from datetime import timedelta

    import boto3
    import torch.distributed as dist

    from ecdit_dist.data.index import open_dataset_once
    from ecdit_dist.data.shards import DatasetIndex, ParquetSource

    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    import pyarrow.parquet  # noqa: F401  imports and botocore's model files are loaded before the clock starts

    from ecdit_dist.data.storage import S3Storage

    boto3.setup_default_session()
    S3Storage()
    counts: collections.Counter = collections.Counter()
    boto3.DEFAULT_SESSION.events.register("before-send.s3", lambda event_name, **kw: counts.update(
        [event_name.rsplit(".", 1)[-1]]))
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    if mode == "per-rank":
        index = DatasetIndex.build(root)
    else:
        index = open_dataset_once(root, mode={"index": "verify", "trust": "trust", "scan": "scan"}[mode])
    ParquetSource(index)
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - t0
    if world > 1:
        dist.destroy_process_group()
    return {"seconds": seconds, "requests": sum(counts.values()), "by_op": dict(counts), "shards": len(index.shards)}


def measure(root: str, n: int, ranks: int, mode: str, work: Path) -> dict:
    import warnings

    from ecdit_dist.parallel.local import run_ranks

    warnings.filterwarnings("ignore", message=".*no dataset index.*")
    res = run_ranks(start_rank, ranks, work / f"{mode}-{n}-{ranks}", root, mode, timeout=1800)
    assert all(r["shards"] == n for r in res), res
    return {"shards": n, "ranks": ranks, "mode": mode, "seconds": max(r["seconds"] for r in res),
            "requests_total": sum(r["requests"] for r in res), "requests_rank0": res[0]["requests"],
            "requests_max_other_rank": max((r["requests"] for r in res[1:]), default=0)}


def index_at_scale(n: int, row_groups: int = 16) -> dict:
    """An index of n shards (4096 rows in 16 row groups each) in memory: its JSON size (what rank 0
    reads and broadcasts) and the time to parse it into a DatasetIndex (what every rank does), as
    wall and CPU seconds (CPU seconds are what an idle core would take on this machine)."""
    from ecdit_dist.data.index import INDEX_FORMAT, INDEX_VERSION, _parse
    from ecdit_dist.data.shards import ParquetSource

    meta = {"format": 1, "latent_shape": [4, 32, 32], "latent_dtype": "bfloat16", "latent_scale": 1.0}
    doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "meta": meta, "columns": ["id", "latent", "caption"],
           "shards": [{"name": f"shard-{i:06d}.parquet", "size": 33_000_000 + i, "row_groups": [256] * row_groups,
                       "sha256": f"{i:064x}"} for i in range(n)]}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    del doc
    t0, c0 = time.perf_counter(), time.process_time()
    index = _parse("s3://bucket/data", raw, "s3://bucket/data/ecdit-index.json")
    source = ParquetSource(index)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"shards": n, "samples": len(source), "index_bytes": len(raw), "parse_wall_s": wall, "parse_cpu_s": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000], help="shard counts (1 rank)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts (at --rank-shards)")
    p.add_argument("--rank-shards", type=int, default=1000, help="shards for the rank sweep")
    p.add_argument("--modes", nargs="+", default=["index", "trust", "scan", "per-rank"],
                   choices=["index", "trust", "scan", "per-rank"])
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--scale", type=int, default=300_000, help="shards of the in-memory index measured at the end")
    p.add_argument("--scale-only", action="store_true", help="only measure the in-memory index (no S3)")
    args = p.parse_args()
    if args.scale_only:
        print(json.dumps(index_at_scale(args.scale)))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))        # stop the S3 server on the way out

    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import seaweed

    import boto3

    rows = []
    with tempfile.TemporaryDirectory(prefix="ecdit-startup-") as tmp, seaweed(Path(tmp) / "weed"):
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        data = tiny_shard()
        for n in sorted(set(args.shards) | {args.rank_shards}):
            t0 = time.perf_counter()
            populate(f"s3://{BUCKET}/n{n}", n, data)
            print(f"uploaded {n} shards in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        plan = [(n, 1, m) for n in args.shards for m in args.modes if m != "per-rank"]
        plan += [(args.rank_shards, r, m) for r in args.ranks for m in args.modes if (args.rank_shards, r, m) not in
                 plan and not (r == 1 and m == "per-rank" and "scan" in args.modes)]
        for n, r, m in plan:
            row = measure(f"s3://{BUCKET}/n{n}", n, r, m, Path(tmp))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| shards | ranks | mode | start-up s | S3 requests, all ranks | rank 0 | any other rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shards']} | {r['ranks']} | {r['mode']} | {r['seconds']:.2f} | {r['requests_total']} | "
              f"{r['requests_rank0']} | {r['requests_max_other_rank']} |")
    scale = index_at_scale(args.scale)
    print(f"index of {scale['shards']} shards ({scale['samples']} samples): {scale['index_bytes'] / 1e6:.1f} MB "
          f"JSON; parsed into a DatasetIndex and a ParquetSource in {scale['parse_wall_s']:.2f} s "
          f"({scale['parse_cpu_s']:.2f} CPU s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "index_at_scale": scale}, indent=1))


if __name__ == "__main__":
    main()
