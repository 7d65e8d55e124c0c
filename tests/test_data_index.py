"""The dataset index on a real S3 server: listings of several pages, constant start-up requests
per rank, identical training with and without it, and stale indexes."""

import json
import random
import shutil

import numpy as np
import pytest

from ecdit_dist.config import load_config
from ecdit_dist.data import tools
from ecdit_dist.data.index import INDEX_NAME, index_url, open_dataset
from ecdit_dist.data.shards import DatasetIndex, ParquetSource
from ecdit_dist.data.storage import DataError, S3Storage, sha256_of
from ecdit_dist.metrics import read_metrics
from ecdit_dist.parallel.local import run_ranks
from ecdit_dist.train import Trainer
from index_workers import count_s3_requests, start_and_train
from s3server import seaweed
from workers import QUIET, TINY

pytestmark = pytest.mark.slow
BUCKET = "ecdit-index"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweed(tmp_path_factory.mktemp("seaweed")) as endpoint:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    tools.synth(out, 256, latent_size=16, shard_rows=64, row_group=16, seed=random.SystemRandom().randrange(2**31))
    return out


def test_listing_follows_every_page_for_the_index_and_the_storage_helper(s3, tmp_path, monkeypatch):
    many = tmp_path / "many"
    tools.synth(many, 31 * 8, latent_size=4, shard_rows=8, row_group=4, seed=random.SystemRandom().randrange(2**31))
    local = sorted(p.name for p in many.iterdir())
    assert len(local) == 32 and INDEX_NAME in local                          # 31 shards + the index
    tools.upload(many, f"s3://{BUCKET}/pages")
    # a sibling prefix that starts with the same letters is not part of the dataset
    S3Storage().put_bytes(f"s3://{BUCKET}/pages-old/shard-99999.parquet", (many / "shard-00000.parquet").read_bytes())
    monkeypatch.setattr(S3Storage, "page_size", 4)                           # 4 keys per page: 8 pages
    # the listing helper that the dataset and the checkpoint mirror share
    with count_s3_requests() as n:
        objects = S3Storage().list(f"s3://{BUCKET}/pages/")
    assert [o.path for o in objects] == [f"s3://{BUCKET}/pages/{name}" for name in local]
    assert n["ListObjectsV2"] == 8
    assert all(o.size == (many / o.path.rsplit("/", 1)[1]).stat().st_size for o in objects)
    # the index written from a multi-page listing of S3 holds every shard, with its checksum
    (many / INDEX_NAME).unlink()
    S3Storage().delete(index_url(f"s3://{BUCKET}/pages"))
    result = tools.index(f"s3://{BUCKET}/pages")
    assert result["shards"] == 31 and result["samples"] == 31 * 8
    doc = json.loads(S3Storage().get(index_url(f"s3://{BUCKET}/pages")))
    assert [e["name"] for e in doc["shards"]] == [n for n in local if n != INDEX_NAME]
    assert all(e["sha256"] == sha256_of(many / e["name"]) for e in doc["shards"])
    assert doc["fingerprint"] == DatasetIndex.build(str(many)).fingerprint()  # the same shards as the local set
    # checking the index against a multi-page listing: every shard found, nothing called stale
    with count_s3_requests() as n:
        ds = open_dataset(f"s3://{BUCKET}/pages", mode="verify")
    assert len(ds.shards) == 31 and ds.num_samples == 31 * 8 and not ds.skipped
    assert dict(n) == {"GetObject": 1, "ListObjectsV2": 8}
    # the footer scan too
    assert len(DatasetIndex.build(f"s3://{BUCKET}/pages").shards) == 31


def test_start_requests_per_rank_are_constant_with_an_index_and_training_is_identical(shards, s3, tmp_path):
    tools.upload(shards, f"s3://{BUCKET}/train")
    common = [f"data.path=s3://{BUCKET}/train", "train.global_batch_size=16", "logging.interval=1"]
    steps = 3
    runs = {}
    for mode in ("verify", "scan"):
        runs[mode] = run_ranks(start_and_train, 2, tmp_path / f"{mode}-ranks", str(tmp_path / mode),
                               [*common, f"data.index={mode}"], steps, timeout=300)
    (v0, ids_v0), (v1, ids_v1) = runs["verify"]
    (o0, ids_o0), (o1, ids_o1) = runs["scan"]
    # with the index: rank 0 reads it and lists the prefix once; the other rank asks S3 nothing
    assert v0 == {"GetObject": 1, "ListObjectsV2": 1} and v1 == {}
    # scanning instead: rank 0 lists and reads the 4 footers (one request each); still nothing on rank 1
    assert o0 == {"GetObject": 4, "ListObjectsV2": 1} and o1 == {}
    assert ids_v0 == ids_o0 and ids_v1 == ids_o1 and len(ids_v0) == steps
    loss_v = [m["loss"] for m in read_metrics(tmp_path / "verify")]
    loss_o = [m["loss"] for m in read_metrics(tmp_path / "scan")]
    assert len(loss_v) == steps and loss_v == loss_o
    # trusted: one request in all
    with count_s3_requests() as n:
        ds = open_dataset(f"s3://{BUCKET}/train", mode="trust")
    assert dict(n) == {"GetObject": 1} and ds.fingerprint() == DatasetIndex.build(str(shards)).fingerprint()


def test_stale_index_names_the_shard_or_skips_it(shards, s3, tmp_path):
    # a shard replaced after indexing (local folder)
    local = tmp_path / "local"
    shutil.copytree(shards, local)
    other = tmp_path / "other"
    tools.synth(other, 64, latent_size=16, shard_rows=64, row_group=8, seed=1)
    shutil.copy(other / "shard-00000.parquet", local / "shard-00001.parquet")
    with pytest.raises(DataError, match=r"shard-00001.parquet: \d+ bytes, the index says \d+ .*index .* is stale"):
        open_dataset(str(local))
    ds = open_dataset(str(local), on_error="skip")
    assert [p.rsplit("/", 1)[1] for p, _ in ds.skipped] == ["shard-00001.parquet"]
    assert ds.num_samples == 192 and "shard-00001.parquet" not in [s.path[-19:] for s in ds.shards]
    # trusted without a listing: the replaced shard's footer disagrees with the index when it is opened
    src = ParquetSource(open_dataset(str(local), mode="trust"))
    src.batch([0])
    with pytest.raises(DataError, match=r"shard-00001.parquet: the shard changed after the dataset was indexed"):
        src.batch([70])
    # a shard deleted after indexing (S3)
    tools.upload(shards, f"s3://{BUCKET}/stale")
    S3Storage().delete(f"s3://{BUCKET}/stale/shard-00002.parquet")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/stale/shard-00002.parquet: deleted after the dataset "
                                        r"was indexed; the dataset index .* is stale: re-run `ecdit data index"):
        open_dataset(f"s3://{BUCKET}/stale")
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"data.path=s3://{BUCKET}/stale", "data.on_error=skip", f"run.dir={run}",
                             "train.steps=2", "logging.interval=1", "checkpoint.interval=2",
                             "train.global_batch_size=16", *QUIET[:-1]])
    trainer = Trainer(cfg)
    trainer.fit()
    assert all(m["data/skipped_shards"] == 1 for m in read_metrics(run))
    meta = json.loads((run / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["data"]["skipped_shards"] == [f"s3://{BUCKET}/stale/shard-00002.parquet"]
    assert meta["data"]["epoch_size"] == 192
    ids = np.concatenate([trainer.data._load(s)["ids"].numpy() for s in range(12)])
    assert sorted(ids.tolist()) == [i for i in range(256) if not 128 <= i < 192]   # an epoch, shard 2 left out


def test_missing_index_warns_and_scans_and_a_bad_index_is_named(shards, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    (bare / INDEX_NAME).unlink()
    with pytest.warns(UserWarning, match=r"no dataset index \(ecdit-index.json\); reading the footer of every shard"):
        ds = open_dataset(str(bare))
    assert ds.source == "footers" and ds.fingerprint() == open_dataset(str(shards)).fingerprint()
    doc = json.loads((shards / INDEX_NAME).read_text())
    (bare / INDEX_NAME).write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(DataError, match=r"ecdit-index.json: dataset index version 99, this ecdit reads version 1"):
        open_dataset(str(bare))
    (bare / INDEX_NAME).write_text("{not json")
    with pytest.raises(DataError, match=r"ecdit-index.json: the dataset index is not JSON"):
        open_dataset(str(bare))
