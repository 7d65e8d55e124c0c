"""Data loader throughput against a raw sequential read of the same bytes.

    python benchmarks/loader.py                                  # local shards (made here)
    python benchmarks/loader.py --s3 s3://bucket/prefix          # also from S3 (AWS_* / AWS_ENDPOINT_URL set)

The shapes data is written as shards (8 x 32 x 32 float16 latents); then, cold cache each
time: `raw` reads every shard file front to back (local: read(); S3: one ranged GET per
16 MiB), `loader` runs one epoch of the training order (block shuffle, global batch 256,
one data-parallel rank) through ParquetSource, decode included. Reported: samples/s and the
ratio of the loader's to the raw read's bytes per second.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import cold_cache


def raw_read(root: str) -> tuple[float, int]:
    from ecdit_dist.data.storage import S3Storage, is_s3, storage_for

    storage = storage_for(root)
    objects = storage.list(root, ".parquet")
    t0 = time.perf_counter()
    total = 0
    for o in objects:
        if is_s3(root):
            assert isinstance(storage, S3Storage)
            for start in range(0, o.size, 16 << 20):
                total += len(storage.read_range(o.path, start, min(o.size, start + (16 << 20))))
        else:
            with open(o.path, "rb") as f:
                while block := f.read(16 << 20):
                    total += len(block)
    return time.perf_counter() - t0, total


def loader_epoch(root: str, batch: int, window: int) -> tuple[float, int]:
    from ecdit_dist.data.sampler import BlockShuffle, rank_positions
    from ecdit_dist.data.shards import DatasetIndex, ParquetSource

    t0 = time.perf_counter()
    index = DatasetIndex.build(root)
    src = ParquetSource(index, cache_blocks=2 * window)
    order = BlockShuffle(src.block_sizes(), seed=0, window=window)
    n = 0
    for step in range(len(src) // batch):
        out = src.batch(order(rank_positions(step, batch, 0, 1)))
        n += len(out["ids"])
    return time.perf_counter() - t0, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--s3", default=None, help="also upload there and measure from S3")
    p.add_argument("--json")
    args = p.parse_args()

    from ecdit_dist.data import tools

    work = Path(tempfile.mkdtemp(prefix="ecdit-loader-"))
    # uncompressed: real VAE latents do not compress the way the flat toy images do
    tools.synth(work / "shards", args.num, latent_size=32, shard_rows=1024, row_group=128, compression="none")
    roots = {"local": str(work / "shards")}
    if args.s3:
        tools.upload(work / "shards", args.s3)
        roots["s3"] = args.s3
    results = {}
    for name, root in roots.items():
        cold_cache()
        raw_s, nbytes = raw_read(root)
        cold_cache()
        load_s, n = loader_epoch(root, args.batch, args.window)
        results[name] = {"bytes": nbytes, "samples": n, "raw_s": raw_s, "loader_s": load_s,
                         "loader_samples_per_s": n / load_s, "raw_samples_per_s": n / raw_s,
                         "loader_over_raw": raw_s / load_s}
    print(f"{args.num} samples, {results['local']['bytes'] / 2**20:.1f} MiB of shards")
    print("| source | raw read s | loader epoch s | loader samples/s | loader / raw |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['raw_s']:.2f} | {r['loader_s']:.2f} | {r['loader_samples_per_s']:.0f} | "
              f"{r['loader_over_raw']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
