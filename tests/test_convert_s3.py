"""`ecdit convert` with s3:// sources and destinations, on a real SeaweedFS server."""

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecdit_dist.checkpoint import convert as C
from ecdit_dist.checkpoint import remote
from ecdit_dist.checkpoint.errors import CheckpointError
from ecdit_dist.checkpoint.tensors import ConvertError
from ecdit_dist.config import config_from_dict, load_config
from ecdit_dist.data.storage import DataError, S3Storage
from ecdit_dist.model import ECDiT
from ecdit_dist.train import Trainer
from s3server import SECRET_KEY, seaweed
from workers import QUIET, TINY

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ckpts"
pytestmark = pytest.mark.slow
SMALL = ["model.num_layers=2"]          # 2 blocks (one MoE): few tensors, few requests


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`ecdit ARGS` in this process (errors are printed and returned as exit status 2, as from a shell)."""
    from ecdit_dist.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def upload_folder(s3, folder: Path, url: str) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.put_file(f, f"{url}/{f.relative_to(folder).as_posix()}")


def keys(s3, url: str) -> set[str]:
    return {k.rsplit("/", 1)[-1] for k in remote._keys(s3, url)}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.name != "config.json"}


def remote_bytes(s3, url: str) -> dict[str, bytes]:
    return {n: s3.read_bytes(f"{url}/{n}") for n in keys(s3, url) if n != "config.json"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweed(tmp_path_factory.mktemp("seaweed")):
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield S3Storage()


@pytest.fixture(scope="module")
def trained(s3, tmp_path_factory):
    """A training checkpoint on disk and its copy on S3 in the mirror's layout (run prefix with
    checkpoints/latest), plus its consolidated export on disk and on S3."""
    run = tmp_path_factory.mktemp("run")
    t = Trainer(load_config(TINY, [f"run.dir={run}", "train.steps=2", *QUIET, *SMALL, "checkpoint.interval=2"]))
    t.fit()
    state = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    upload_folder(s3, run / "checkpoints", f"s3://{BUCKET}/run/checkpoints")
    exported = tmp_path_factory.mktemp("exported") / "exp"
    C.export(run, exported, max_shard_size="64KB")
    return run, state, exported


def test_export_import_roundtrip_through_s3_is_bit_exact(s3, trained, tmp_path, monkeypatch):
    run, state, exported = trained
    staged_at_upload = []
    put_file = S3Storage.put_file

    def counting_put_file(self, local, dest, sha256=None):
        staged_at_upload.append(len(list(Path(local).parent.glob("*.safetensors"))))
        return put_file(self, local, dest, sha256)

    monkeypatch.setattr(S3Storage, "put_file", counting_put_file)
    out = f"s3://{BUCKET}/t1/exp"
    C.export(f"s3://{BUCKET}/run", out, max_shard_size="64KB")         # S3 training checkpoint -> S3
    monkeypatch.setattr(S3Storage, "put_file", put_file)
    local = folder_bytes(exported)
    assert len(local) > 8 and remote_bytes(s3, out) == local                # the same bytes as a local export
    assert max(staged_at_upload) <= 3                                       # a few shards staged, never all
    assert json.loads(s3.read_bytes(f"{out}/config.json"))["step"] == 2

    C.import_(out, f"s3://{BUCKET}/t1/imported")                          # S3 consolidated -> S3 run
    C.export(f"s3://{BUCKET}/t1/imported", tmp_path / "back", max_shard_size="0")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    fresh = Trainer(load_config(TINY, [f"run.dir={tmp_path / 'fresh'}", "train.steps=1", *QUIET, *SMALL,
                                       f"checkpoint.mirror=s3://{BUCKET}/t1/imported"]))
    assert fresh.resume() and fresh.step == 0                              # training starts from the S3 import
    now = fresh.model.state_dict()
    assert all(torch.equal(now[k], state[k]) for k in state)

    # one tensor costs one ranged read of its own bytes, not the file it lives in
    src = remote.open_source(out)
    name = max(src.infos, key=lambda k: src.infos[k].nbytes)
    fetched = count_reads(src.s3.client)
    assert torch.equal(src.load(name), state[name])
    assert sum(fetched) == src.infos[name].nbytes
    dcp = remote.open_source(f"s3://{BUCKET}/run", verify=False)
    fetched = count_reads(dcp.s3.client)
    data_size = (run / "checkpoints" / "step-00000002" / "__0_0.distcp").stat().st_size
    assert torch.equal(dcp.load(name), state[name])
    # the tensor's bytes plus two small blocks of DCP's item framing (its head and its tail)
    assert dcp.infos[name].nbytes <= sum(fetched) <= dcp.infos[name].nbytes + 2 * (256 << 10) < data_size / 4


def count_reads(client) -> list[int]:
    """Bytes asked for by each ranged GET of `client` from now on."""
    fetched, get_object = [], client.get_object

    def counting_get(**kw):
        lo, hi = kw["Range"].removeprefix("bytes=").split("-")
        fetched.append(int(hi) - int(lo) + 1)
        return get_object(**kw)

    client.get_object = counting_get
    return fetched


def test_merge_and_upcycle_from_and_to_s3_equal_local(s3, trained, tmp_path):
    run, state, exported = trained
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    other = tmp_path / "other"
    other.mkdir()
    save_file({k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()},
              str(other / "model.safetensors"))
    (other / "config.json").write_bytes((exported / "config.json").read_bytes())
    upload_folder(s3, other, f"s3://{BUCKET}/t2/other")
    C.merge([run, other], tmp_path / "merged", weights=[0.3, 0.7], max_shard_size="64KB")
    C.merge([f"s3://{BUCKET}/run", f"s3://{BUCKET}/t2/other"], f"s3://{BUCKET}/t2/merged", weights=[0.3, 0.7],
            max_shard_size="64KB")
    assert remote_bytes(s3, f"s3://{BUCKET}/t2/merged") == folder_bytes(tmp_path / "merged")
    with pytest.raises(ConvertError, match="also an input"):             # re-sharding in place would read
        C.merge([f"s3://{BUCKET}/t2/merged"], f"s3://{BUCKET}/t2/merged", max_shard_size="0", overwrite=True)
    assert remote_bytes(s3, f"s3://{BUCKET}/t2/merged") == folder_bytes(tmp_path / "merged")

    dense = tmp_path / "dense"
    cfg = config_from_dict({"model": {"preset": "tiny-dense", "num_layers": 2}, "moe": {"num_experts": 0}},
                           validate=False)
    torch.manual_seed(seed)
    dense.mkdir()
    save_file({k: v.contiguous() for k, v in ECDiT(cfg.model, cfg.moe).state_dict().items()},
              str(dense / "model.safetensors"))
    full = cfg.to_dict()
    (dense / "config.json").write_text(json.dumps({"model": full["model"], "moe": full["moe"]}))
    upload_folder(s3, dense, f"s3://{BUCKET}/t2/dense")
    C.upcycle(dense, tmp_path / "up", 4, noise=0.01, seed=seed, max_shard_size="0")
    C.upcycle(f"s3://{BUCKET}/t2/dense/model.safetensors", f"s3://{BUCKET}/t2/up", 4, noise=0.01, seed=seed,
              max_shard_size="0")
    assert remote_bytes(s3, f"s3://{BUCKET}/t2/up") == folder_bytes(tmp_path / "up")
    assert json.loads(s3.read_bytes(f"s3://{BUCKET}/t2/up/config.json"))["moe"]["num_experts"] == 4


def test_inspect_verifies_s3_checkpoints(s3, trained, capsys):
    run, state, exported = trained
    rc, out, err = run_cli(capsys, "convert", "inspect", f"s3://{BUCKET}/run", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["kind"] == "training" and report["step"] == 2 and report["verified_files"] == 3
    assert report["tensors"].keys() == state.keys()
    upload_folder(s3, exported, f"s3://{BUCKET}/t3/exp")
    report = C.inspect(f"s3://{BUCKET}/t3/exp")
    assert report["kind"] == "safetensors" and report["matches_config"] is True

    step = run / "checkpoints" / "step-00000002"
    with remote.local_copy(f"s3://{BUCKET}/run/checkpoints") as copy:       # what `convert deepspeed` reads
        assert {p.name: p.read_bytes() for p in (copy / step.name).iterdir()} == \
            {p.name: p.read_bytes() for p in step.iterdir()}
    bad = f"s3://{BUCKET}/t3/bad"
    upload_folder(s3, step, bad)
    data = bytearray((step / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 1                                           # one flipped bit, same size
    s3.put_bytes(f"{bad}/__0_0.distcp", bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp does not match its sha256"):
        C.inspect(bad)
    with pytest.raises(CheckpointError, match="sha256"):
        C.export(bad, f"s3://{BUCKET}/t3/never")
    assert not keys(s3, f"s3://{BUCKET}/t3/never")
    assert C.inspect(bad, verify=False)["matches_config"] is True        # sizes still agree


KILL_AFTER_TWO_UPLOADS = textwrap.dedent("""
    import os, signal, sys
    from ecdit_dist.data.storage import S3Storage
    put, count = S3Storage.put_file, [0]
    def put_then_die(self, *a, **k):
        put(self, *a, **k)
        count[0] += 1
        if count[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    S3Storage.put_file = put_then_die
    from ecdit_dist.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_failed_or_killed_upload_leaves_nothing_readable(s3, trained, monkeypatch, capsys):
    run, state, exported = trained
    put_file, calls = S3Storage.put_file, []

    def failing_put_file(self, local, dest, sha256=None):
        calls.append(dest)
        if len(calls) == 3:
            raise DataError(f"{dest}: InternalError: injected")
        return put_file(self, local, dest, sha256)

    monkeypatch.setattr(S3Storage, "put_file", failing_put_file)
    failed = f"s3://{BUCKET}/t4/failed"
    with pytest.raises(DataError, match="injected"):
        C.export(run, failed, max_shard_size="64KB")
    monkeypatch.setattr(S3Storage, "put_file", put_file)
    assert len(calls) == 3 and not keys(s3, failed)                      # what was uploaded is deleted again

    load, seen = remote.S3DCPSource.load, []

    def failing_load(self, name, out=None):                             # a read fails after shards went up
        seen.append(name)
        if len(seen) == 20:
            deadline = time.time() + 30
            while not keys(s3, failed) and time.time() < deadline:
                time.sleep(0.05)
            assert keys(s3, failed)
            raise CheckpointError("injected read failure")
        return load(self, name, out)

    monkeypatch.setattr(remote.S3DCPSource, "load", failing_load)
    with pytest.raises(CheckpointError, match="injected read failure"):
        C.export(f"s3://{BUCKET}/run", failed, max_shard_size="64KB")
    monkeypatch.setattr(remote.S3DCPSource, "load", load)
    assert len(seen) >= 20 and not keys(s3, failed)        # (worker threads may have started a few more reads)

    killed = f"s3://{BUCKET}/t4/killed"
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_UPLOADS, "convert", "export", "--checkpoint",
                           str(run), "--out", killed, "--max-shard-size", "64KB"], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -9, done.stderr
    left = keys(s3, killed)
    assert left and "config.json" not in left                            # shards, never the commit marker
    rc, _, err = run_cli(capsys, "convert", "export", "--checkpoint", run, "--out", killed)
    assert rc == 2 and "not empty" in err and "config.json" in err and "--overwrite" in err
    with pytest.raises(ConvertError, match="config.json not found"):
        C.merge([killed], f"s3://{BUCKET}/t4/never")
    C.export(run, killed, max_shard_size="64KB", overwrite=True)
    assert remote_bytes(s3, killed) == folder_bytes(exported)            # old leftovers gone, new output whole


def test_bad_bucket_or_credentials_are_clear_errors(s3, trained, monkeypatch, capsys):
    run, _, _ = trained
    rc, _, err = run_cli(capsys, "convert", "export", "--checkpoint", run, "--out", "s3://no-such-bucket/x")
    assert rc == 2 and "s3://no-such-bucket/x" in err and "bucket not found" in err, err
    wrong = "wrong-secret-5f2a9c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)                  # a fresh session reads the new secret
    for args in (["inspect", f"s3://{BUCKET}/run"], ["merge", f"s3://{BUCKET}/run", "--out", f"s3://{BUCKET}/t5"]):
        rc, out, err = run_cli(capsys, "convert", *args)
        assert rc == 2 and "access denied" in err and "credentials" in err, err
        assert len(err.strip().splitlines()) == 1                        # one line, no traceback
        for secret in (wrong, SECRET_KEY):
            assert secret not in out + err


def test_deepspeed_checkpoint_from_s3_to_s3_equals_local(s3, tmp_path):
    """`convert deepspeed` with a ZeRO checkpoint on S3 and an S3 output: the same bytes as on disk."""
    from ecdit_dist.parallel.local import run_ranks
    from workers import deepspeed_checkpoint

    weights = run_ranks(deepspeed_checkpoint, 2, tmp_path / "ranks", str(tmp_path / "ds"), 2, timeout=400)[0]
    C.from_deepspeed(tmp_path / "ds", tmp_path / "local", TINY, max_shard_size="0")
    upload_folder(s3, tmp_path / "ds", f"s3://{BUCKET}/ds")
    out = f"s3://{BUCKET}/t6/from-ds"
    C.from_deepspeed(f"s3://{BUCKET}/ds", out, TINY, max_shard_size="0")
    local = folder_bytes(tmp_path / "local")
    assert local and remote_bytes(s3, out) == local
    got = load_file(tmp_path / "local" / "model.safetensors")
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k].float()) for k in weights)
    got_cfg = json.loads(s3.read_bytes(f"{out}/config.json"))
    local_cfg = json.loads((tmp_path / "local" / "config.json").read_text())
    assert got_cfg.pop("converted_from") == f"deepspeed:s3://{BUCKET}/ds"       # the source, not a temporary copy
    local_cfg.pop("converted_from")
    assert got_cfg == local_cfg
