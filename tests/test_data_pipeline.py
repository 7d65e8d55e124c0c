"""Parquet shards on disk and on a real S3 server: format, sampling, resume, bad input, T5 text."""

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ecdit_dist.config import ConfigError, load_config
from ecdit_dist.data import tools
from ecdit_dist.data.sampler import BlockShuffle, rank_positions
from ecdit_dist.data.shapes import ShapesSource
from ecdit_dist.data.shards import DatasetIndex, ParquetSource
from ecdit_dist.data.storage import DataError, S3Storage
from ecdit_dist.metrics import read_metrics
from ecdit_dist.parallel.local import run_ranks
from ecdit_dist.train import Trainer
from s3server import SECRET_KEY, seaweed
from workers import QUIET, TINY, train_collect_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweed(tmp_path_factory.mktemp("seaweed")) as endpoint:
        import boto3

        boto3.client("s3").create_bucket(Bucket="ecdit-data")
        yield endpoint


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    tools.synth(out, 256, latent_size=16, shard_rows=64, row_group=16, seed=5)
    return out


def test_block_shuffle_uses_every_sample_once_per_epoch_on_any_layout():
    seed = random.SystemRandom().randrange(2**31)
    sizes = np.random.default_rng(seed).integers(1, 20, size=37)
    order = BlockShuffle(sizes, seed, window=4)
    n = order.num_samples
    for dp in (1, 2, 4):
        gb = 8
        seen = np.concatenate([order(rank_positions(s, gb, r, dp)) for s in range(n // gb) for r in range(dp)])
        assert len(np.unique(seen)) == len(seen)
    epoch0 = order(np.arange(n))
    assert sorted(epoch0.tolist()) == list(range(n))
    assert sorted(order(np.arange(n, 2 * n)).tolist()) == list(range(n))
    assert not np.array_equal(epoch0, order(np.arange(n, 2 * n)))
    block_of = np.repeat(np.arange(sizes.size), sizes)
    # locality: the first window (4 blocks) is used up before any other block is touched
    first_window = int(order._epoch(0)[2][1])
    assert len(np.unique(block_of[epoch0[:first_window]])) == 4


def test_shards_hold_the_embedded_data(shards):
    index = DatasetIndex.build(str(shards))
    assert index.num_samples == 256 and len(index.shards) == 4 and index.block_sizes().tolist() == [16] * 16
    src = ParquetSource(index)
    ids = [3, 200, 17, 64]
    got = src.batch(ids)
    want_lat, want_cap = ShapesSource(256, 32, 5).batch(ids)
    assert got["ids"].tolist() == ids and got["captions"] == want_cap
    torch.testing.assert_close(got["latents"], want_lat.half().float(), rtol=0, atol=0)
    stats = tools.stats(str(shards))
    assert stats["samples"] == 256 and stats["columns"] == ["id", "latent", "caption"]


def test_s3_reads_are_ranged_and_partial(shards, s3):
    tools.upload(shards, "s3://ecdit-data/ranged")
    index = DatasetIndex.build("s3://ecdit-data/ranged")
    src = ParquetSource(index)
    src.storage.read_ahead = 4096               # small read-ahead, so the test sees what is really requested
    requests = []
    src.storage.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **kw: requests.append(request.headers.get("Range")))
    got = src.batch([0, 1, 130])
    assert got["ids"].tolist() == [0, 1, 130]
    assert requests and all(r is not None and r.startswith(b"bytes=" if isinstance(r, bytes) else "bytes=")
                            for r in requests)
    total = sum(s.size for s in index.shards)
    fetched = sum(int(str(r).split("-")[1].rstrip("'")) - int(str(r).split("=")[1].split("-")[0]) + 1
                  for r in requests)
    assert fetched < total / 2


def test_train_from_s3_stop_on_2_ranks_resume_on_4_every_sample_once(shards, s3, tmp_path):
    tools.upload(shards, "s3://ecdit-data/epoch")
    common = ["data.path=s3://ecdit-data/epoch", "train.global_batch_size=16", "sample.at_end=false"]
    run = tmp_path / "run"
    first = run_ranks(train_collect_ids, 2, tmp_path / "a", str(run), common, 6, timeout=300)
    second = run_ranks(train_collect_ids, 4, tmp_path / "b", str(run), common, 16, timeout=300)
    ids = [i for rank in first + second for _, batch in rank for i in batch]
    assert sorted(ids) == list(range(256))                    # one epoch: 16 steps x 16 = 256, each id once
    assert {s for rank in first for s, _ in rank} == set(range(6))
    assert {s for rank in second for s, _ in rank} == set(range(6, 16))
    meta = json.loads((run / "checkpoints" / "step-00000016" / "meta.json").read_text())
    assert meta["data"]["position"] == 256 and meta["data"]["epoch_size"] == 256


def _bad_copies(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    data = (bad / "shard-00002.parquet").read_bytes()
    (bad / "shard-00002.parquet").write_bytes(data[: len(data) // 2])        # truncated
    return bad


def test_truncated_shard_is_named_or_skipped_and_counted(shards, s3, tmp_path):
    bad = _bad_copies(shards, tmp_path)
    with pytest.raises(DataError, match=r"shard-00002.parquet: not a readable Parquet shard"):
        DatasetIndex.build(str(bad))
    tools.upload(bad, "s3://ecdit-data/bad")
    with pytest.raises(DataError, match=r"s3://ecdit-data/bad/shard-00002.parquet: not a readable Parquet shard"):
        DatasetIndex.build("s3://ecdit-data/bad")
    cfg = load_config(TINY, ["data.path=s3://ecdit-data/bad", "data.on_error=skip", f"run.dir={tmp_path / 'r'}",
                             "train.steps=2", "logging.interval=1", "train.global_batch_size=16", *QUIET])
    Trainer(cfg).fit()
    metrics = read_metrics(tmp_path / "r")
    assert all(m["data/skipped_shards"] == 1 for m in metrics)
    meta = json.loads((tmp_path / "r" / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["data"]["skipped_shards"] == ["s3://ecdit-data/bad/shard-00002.parquet"]
    assert meta["data"]["epoch_size"] == 192


def test_wrong_schema_and_wrong_latent_shape(shards, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(pa.table({"id": [1], "caption": ["x"]}), wrong / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: wrong schema, missing column\(s\) \['latent'\]"):
        DatasetIndex.build(str(wrong))
    nometa = tmp_path / "nometa"
    nometa.mkdir()
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "latent": pa.array([b"x"], pa.binary()),
                             "caption": ["x"]}), nometa / "a.parquet")
    with pytest.raises(DataError, match="no 'ecdit' file metadata"):
        DatasetIndex.build(str(nometa))
    cfg = load_config(TINY, [f"data.path={shards}", "model.latent_size=8", f"run.dir={tmp_path}", *QUIET])
    with pytest.raises(ConfigError, match=r"latents of shape \(8, 16, 16\), the model expects \(8, 8, 8\)"):
        Trainer(cfg)


def test_missing_object_and_denied_credentials(shards, s3, tmp_path):
    tools.upload(shards, "s3://ecdit-data/gone")
    index = DatasetIndex.build("s3://ecdit-data/gone")
    S3Storage().delete("s3://ecdit-data/gone/shard-00001.parquet")
    with pytest.raises(DataError, match=r"s3://ecdit-data/gone/shard-00001.parquet: object not found"):
        ParquetSource(index).batch([70])
    with pytest.raises(DataError, match=r"s3://nope-bucket/x: bucket not found"):
        DatasetIndex.build("s3://nope-bucket/x")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong-" + SECRET_KEY}
    out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "data", "stats", "s3://ecdit-data/gone"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert "s3://ecdit-data/gone" in out.stderr and "access denied (SignatureDoesNotMatch)" in out.stderr
    assert SECRET_KEY not in out.stderr + out.stdout
    out = subprocess.run([sys.executable, "-m", "ecdit_dist.train", "--config", str(TINY), "--set",
                          "data.path=s3://ecdit-data/gone", f"run.dir={tmp_path / 'denied'}", *QUIET],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "access denied" in out.stderr and SECRET_KEY not in out.stderr


def test_upload_verify_detects_changes(shards, s3, tmp_path):
    result = tools.upload(shards, "s3://ecdit-data/verify")
    assert result["verified"] and result["uploaded"] == 5                   # 4 shards + the dataset index
    assert tools.verify("s3://ecdit-data/verify", deep=True)["objects"] == 5
    import boto3

    boto3.client("s3").put_object(Bucket="ecdit-data", Key="verify/shard-00000.parquet", Body=b"tampered")
    with pytest.raises(DataError, match="shard-00000.parquet: .* bytes, local"):
        tools.verify("s3://ecdit-data/verify", shards)
    with pytest.raises(DataError, match="no sha256 recorded"):
        tools.verify("s3://ecdit-data/verify")


def tiny_t5(folder: Path) -> Path:
    """A T5 encoder built from a T5Config with a sentencepiece model trained here (nothing downloaded)."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    from ecdit_dist.data.shapes import scene

    captions = [scene(0, i)[0].caption for i in range(2000)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=proto, vocab_size=32,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(proto.getvalue())
    torch.manual_seed(0)
    pieces = spm.SentencePieceProcessor(model_proto=proto.getvalue()).get_piece_size()
    config = T5Config(vocab_size=pieces + 100,                   # + T5's 100 sentinel ids, as the tokenizer adds
                      d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_t5_encoder_online_and_precomputed_agree(shards, tmp_path):
    import sentencepiece as spm

    from ecdit_dist.data.text import T5TextEncoder

    t5 = tiny_t5(tmp_path / "t5")
    enc = T5TextEncoder(str(t5), max_len=40)
    sp = spm.SentencePieceProcessor(model_file=str(t5 / "spiece.model"))
    caption = "two red circles at the top left"
    ids, mask = enc.tokenize([caption])
    want = sp.encode(caption) + [1]                             # + </s>
    assert ids[0, : len(want)].tolist() == want and int(mask.sum()) == len(want)
    assert 2 not in want                                          # no <unk>: the file was really read
    emb, emb_mask = enc.encode([caption, "one blue square at the center"])
    assert emb.shape == (2, 40, 32) and torch.equal(emb[0, len(want):], torch.zeros(40 - len(want), 32))
    assert int(emb_mask[0].sum()) == len(want)

    local = tmp_path / "enc"
    shutil.copytree(shards, local)
    tools.encode(local, enc)
    index = DatasetIndex.build(str(local))
    assert index.has_text() and index.meta["text_dim"] == 32 and index.meta["text_encoder"] == "t5"

    common = ["model.text_dim=32", "model.text_len=40", "train.global_batch_size=16", "train.steps=1",
              "logging.interval=1", f"data.text_encoder={t5}", *QUIET]
    online = Trainer(load_config(TINY, [f"data.path={local}", "data.text_source=online",
                                        f"run.dir={tmp_path / 'on'}", *common]))
    pre = Trainer(load_config(TINY, [f"data.path={local}", f"run.dir={tmp_path / 'pre'}", *common]))
    assert pre.data.precomputed and not online.data.precomputed
    _, t_on, m_on, _ = online.batch(0)
    _, t_pre, m_pre, _ = pre.batch(0)
    assert torch.equal(m_on, m_pre)
    torch.testing.assert_close(t_pre, t_on, rtol=0, atol=2e-3)   # stored as float16
    online.fit()
    pre.fit()
    assert read_metrics(tmp_path / "pre")[0]["loss"] == pytest.approx(read_metrics(tmp_path / "on")[0]["loss"],
                                                                        rel=1e-3)
    with pytest.raises(ConfigError, match="model.text_dim is 64"):
        Trainer(load_config(TINY, [f"data.text_encoder={t5}", f"run.dir={tmp_path / 'x'}", *QUIET]))


def test_checkpoints_mirror_to_s3_and_resume_from_there(s3, tmp_path):
    common = [*QUIET, "train.global_batch_size=16", "logging.interval=1", "checkpoint.interval=2"]
    mirror = ["checkpoint.mirror=s3://ecdit-data/ckpt"]
    Trainer(load_config(TINY, [f"run.dir={tmp_path / 'a'}", "train.steps=4", *common, *mirror])).fit()
    objects = [o.path for o in S3Storage().list("s3://ecdit-data/ckpt/")]
    assert any(p.endswith("step-00000004/manifest.json") for p in objects)
    assert S3Storage().read_bytes("s3://ecdit-data/ckpt/checkpoints/latest").strip() == b"step-00000004"
    straight = Trainer(load_config(TINY, [f"run.dir={tmp_path / 'ref'}", "train.steps=6", *common]))
    straight.fit()
    # a new machine: nothing local, the mirror has the run
    resumed = Trainer(load_config(TINY, [f"run.dir={tmp_path / 'b'}", "train.steps=6", *common, *mirror]))
    resumed.fit()
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == [5, 6]      # it continued from step 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = {p.split("/")[-2] for p in (o.path for o in S3Storage().list("s3://ecdit-data/ckpt/")) if "step-" in p}
    # retention on the remote listing: keep_last=3 of {2, 4, 6}, although machine b never had step 2
    assert steps == {"step-00000002", "step-00000004", "step-00000006"}
