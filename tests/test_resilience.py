"""Fault injection: non-finite steps, tampered checkpoints, full disks, failing ranks, a stopped
mirror, changed configs on resume, interrupted exports. Every fault is real where it can be
(a NaN in a gradient, a tmpfs that fills up, a server that is stopped)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecdit_dist.checkpoint.manager import CheckpointManager
from ecdit_dist.checkpoint.tensors import DCPSource
from ecdit_dist.metrics import read_metrics
from ecdit_dist.parallel.local import run_ranks
from workers import QUIET, TINY, async_vs_sync, full_disk, nonfinite_guard

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "ecdit_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def cli_here(capsys, *args):
    """`ecdit ARGS` in this process (what the console script runs, minus the interpreter start)."""
    from ecdit_dist.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:            # argparse refusing an argument
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


# ----------------------------------------------------------------------------- non-finite guard
def test_divergent_lr_never_writes_a_nonfinite_checkpoint_and_stops(tmp_path):
    run = tmp_path / "run"
    out = cli("train", "--config", TINY, "--set", *QUIET, f"run.dir={run}", "optim.lr=1e6", "optim.warmup_steps=0",
              "train.steps=12", "train.global_batch_size=8", "checkpoint.interval=1", "checkpoint.keep_last=1",
              "train.nonfinite_patience=3", "logging.interval=1")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "consecutive steps with a non-finite loss or gradient" in out.stderr and "Traceback" not in out.stderr
    records = read_metrics(run)
    skipped = [r["nonfinite/skipped_steps"] for r in records]
    assert skipped[-1] == 2 and skipped == sorted(skipped)          # the third skip stops before it is logged
    steps = CheckpointManager(run).committed_steps()
    assert steps, "no checkpoint at all"
    for step in steps:                                             # every checkpoint holds finite weights
        src = DCPSource(run / "checkpoints" / f"step-{step:08d}")
        for name in src.infos:
            assert torch.isfinite(src.load(name)).all(), (step, name)
    healthy = [s for s in steps if json.loads((run / "checkpoints" / f"step-{s:08d}" / "meta.json").read_text())
               ["healthy"]]
    first_bad = next(r["step"] for r in records if r["loss"] is None or not math.isfinite(r["loss"]))
    assert healthy and max(healthy) == first_bad - 1                # the last good one survives keep_last=1


def test_nan_gradient_on_one_of_four_ranks_is_skipped_everywhere(tmp_path):
    steps, bad = 4, 1
    results = run_ranks(nonfinite_guard, 4, tmp_path / "ranks", str(tmp_path), ["parallel.tp=2", "parallel.ep=2"],
                        steps, bad, timeout=600)
    r0 = results[0]
    records = {r["step"]: r for r in r0["records"]}
    assert [records[s]["nonfinite/skipped_steps"] for s in range(1, steps + 1)] == [0, 1, 1, 1]
    for step, loss in r0["ref_losses"].items():                    # every applied step equals the reference
        assert records[step]["loss"] == loss, step
    assert all(r["same_params"] and r["same_ema"] for r in results)
    poisoned = results[1]["poisoned"][0]
    for r in results:                                              # the same error on every rank
        assert r["stop_error"] is not None and r["stop_error"].startswith(f"step {bad}:")
        assert f"{poisoned} (gradient) on rank 1" in r["stop_error"]


def test_rollback_reloads_the_checkpoint_and_skips_the_bad_data_window(tmp_path):
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    poisoned = []

    class Faulty(Trainer):
        def backward_step(self, step):
            out = super().backward_step(step)
            if step == 2 and not poisoned:                  # once: the step after the rollback is clean
                next(self.model.parameters()).grad.view(-1)[0] = float("nan")
                poisoned.append(step)
            return out

    common = [*QUIET, "train.global_batch_size=8", "train.steps=4"]
    t = Faulty(load_config(TINY, [*common, f"run.dir={tmp_path / 'rb'}", "checkpoint.interval=2",
                                  "train.on_nonfinite=rollback"]))
    t.fit()
    ref = Trainer(load_config(TINY, [*common, f"run.dir={tmp_path / 'ref'}"]))
    for s in (0, 1):
        ref.train_step(s)
    ref.data_offset = 1                                     # steps 2, 3 train on the batches of steps 3, 4
    for s in (2, 3):
        ref.train_step(s)
    assert t.step == 4 and t.data_offset == 1 and poisoned == [2]
    a, b = t.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = Trainer(load_config(TINY, [*common, f"run.dir={tmp_path / 'rb'}"]))
    assert resumed.resume() and resumed.step == 4 and resumed.data_offset == 1   # the window is saved

# ----------------------------------------------------------------------------- untrusted checkpoints
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server (tests may stop and restart it) with the bucket `ckpt`."""
    import boto3

    from s3server import seaweed_server

    with seaweed_server(tmp_path_factory.mktemp("seaweed")) as server:
        boto3.client("s3").create_bucket(Bucket="ckpt")
        yield server


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("small") / "run"
    out = cli("train", "--config", TINY, "--set", *QUIET, f"run.dir={run}", "train.steps=2",
              "train.global_batch_size=8")
    assert out.returncode == 0, out.stderr[-3000:]
    return run


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def tamper(run: Path, dest: Path, marker: Path) -> Path:
    """A copy of `run` whose newest .metadata runs code when unpickled, with the manifest re-written to match."""
    import hashlib
    import pickle
    import shutil

    shutil.copytree(run, dest)
    folder = dest / "checkpoints" / "step-00000002"
    data = pickle.dumps(_Payload(marker))
    (folder / ".metadata").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][".metadata"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_tampered_metadata_runs_no_code_anywhere(small_run, s3, tmp_path, capsys):
    from ecdit_dist.data.storage import S3Storage

    marker = tmp_path / "PWNED"
    evil = tamper(small_run, tmp_path / "evil", marker)
    step = evil / "checkpoints" / "step-00000002"
    refused = "refers to builtins.exec, which DCP checkpoint metadata never holds"
    attempts = {       # the readers in this process (a payload would run here too); training in its own
        "inspect": cli_here(capsys, "convert", "inspect", step),
        "inspect --no-verify": cli_here(capsys, "convert", "inspect", step, "--no-verify"),
        "export": cli_here(capsys, "convert", "export", "--checkpoint", evil, "--out", tmp_path / "x"),
        "merge": cli_here(capsys, "convert", "merge", evil, small_run, "--out", tmp_path / "m"),
        "sample": cli_here(capsys, "sample", "--checkpoint", evil, "--steps", "2", "--per-prompt", "1", "--out",
                           tmp_path / "s.png"),
        "resume": cli("train", "--config", TINY, "--set", *QUIET, f"run.dir={evil}", "train.steps=3",
                      "train.global_batch_size=8"),
    }
    storage = S3Storage()
    for f in sorted(step.iterdir()):
        storage.put_file(f, f"s3://ckpt/evil/checkpoints/step-00000002/{f.name}")
    attempts["mirror fetch"] = cli("train", "--config", TINY, "--set", *QUIET, f"run.dir={tmp_path / 'fresh'}",
                                   "train.steps=3", "train.global_batch_size=8", "checkpoint.mirror=s3://ckpt/evil")
    for what, out in attempts.items():
        assert out.returncode in (1, 2), (what, out.stderr[-2000:])
        assert refused in out.stderr, (what, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, (what, out.stderr[-2000:])
    assert not marker.exists()
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()
    good = cli_here(capsys, "convert", "inspect", small_run, "--json")     # a legitimate checkpoint still loads
    assert good.returncode == 0 and json.loads(good.stdout)["matches_config"] is True


# ----------------------------------------------------------------------------- failures become everyone's
@pytest.fixture
def small_disk(tmp_path):
    """A 96 MiB tmpfs, really mounted (needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full-disk test needs a real tmpfs, and mounting one failed: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("phase", ["save", "commit"])
def test_full_disk_fails_every_rank_and_keeps_the_previous_checkpoint(phase, small_disk, tmp_path):
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    run = small_disk / "run"
    errors = run_ranks(full_disk, 4, tmp_path / "ranks", str(run), phase, timeout=400)
    assert all(e is not None for e in errors), errors                 # every rank failed ...
    assert "No space left on device" in errors[0]
    assert len(set(errors)) == 1, errors                               # ... with the same error
    assert ("writing checkpoint step 2" if phase == "save" else "committing checkpoint step 2") in errors[0]
    assert "rank 0" in errors[0]
    assert CheckpointManager(run).committed_steps() == [1]
    (run / "filler").unlink()
    t = Trainer(load_config(TINY, [*QUIET, f"run.dir={run}", "train.steps=2", "train.global_batch_size=8"]))
    assert t.resume() and t.step == 1                                  # the previous one resumes (on 1 rank)
    t.fit()
    assert t.step == 2 and CheckpointManager(run).committed_steps()[-1] == 2


def test_async_save_equals_sync_save_bitwise_on_four_ranks(tmp_path):
    steps = 6
    results = run_ranks(async_vs_sync, 4, tmp_path / "ranks", str(tmp_path), ["parallel.ep=2"], steps, timeout=600)
    for r in results:
        assert all(torch.equal(a, b) for a, b in zip(r["sync"]["params"], r["async"]["params"]))
        assert all(torch.equal(v, r["async"]["ema"][k]) for k, v in r["sync"]["ema"].items())
    assert results[0]["sync"]["losses"] == results[0]["async"]["losses"] and len(results[0]["sync"]["losses"]) == steps
    for step in (2, 4, 6):                                             # and so do the files
        a = DCPSource(tmp_path / "sync" / "checkpoints" / f"step-{step:08d}")
        b = DCPSource(tmp_path / "async" / "checkpoints" / f"step-{step:08d}")
        assert a.infos.keys() == b.infos.keys()
        assert all(torch.equal(a.load(n), b.load(n)) for n in a.infos)


# ----------------------------------------------------------------------------- resume checks
def test_resume_refuses_trajectory_changes_and_accepts_named_ones(tmp_path):
    run = tmp_path / "run"
    base = [*QUIET, f"run.dir={run}", "train.global_batch_size=8"]
    assert cli("train", "--config", TINY, "--set", *base, "train.steps=1").returncode == 0
    first = (run / "config.yaml").read_text()
    out = cli("train", "--config", TINY, "--set", *base, "train.steps=2", "seed=7", "train.global_batch_size=16")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "seed: checkpoint 0, now 7" in out.stderr
    assert "train.global_batch_size: checkpoint 8, now 16" in out.stderr
    assert "checkpoint.allow_changes=[seed,train.global_batch_size]" in out.stderr
    assert (run / "config.yaml").read_text() == first                   # a refused config never replaces it
    assert CheckpointManager(run).committed_steps() == [1]
    out = cli("train", "--config", TINY, "--set", *base, "train.steps=2", "seed=7", "optim.lr=5e-4",
              "checkpoint.allow_changes=[seed]")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout and CheckpointManager(run).committed_steps()[-1] == 2
    history = list((run / "config-history").iterdir())
    assert len(history) == 1 and history[0].read_text() == first        # the earlier config is kept
    assert "seed: 7" in (run / "config.yaml").read_text()


def test_two_phase_recipe_resumes_unmasked_with_another_capacity(tmp_path):
    """configs/phases: masked pretraining, then unmasked fine-tuning with another capacity factor."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    run = tmp_path / "run"
    tokens: list[int] = []

    def phase(name: str, steps: int) -> Trainer:
        cfg = load_config(ROOT / "configs" / "phases" / name,
                          [*QUIET, f"run.dir={run}", f"train.steps={steps}", "train.global_batch_size=8",
                           "logging.interval=1", "moe.capacity_factor=1.0" if "2-" in name else "seed=0"])
        t = Trainer(cfg)
        t.model.blocks[0].register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))
        t.fit()
        return t

    phase("tiny-1-masked-pretrain.yaml", 2)
    assert set(tokens) == {32}                                           # half of the 64 tokens
    tokens.clear()
    t = phase("tiny-2-unmasked-finetune.yaml", 4)
    assert t.step == 4 and set(tokens) == {64}                            # every token
    moe = t.model.blocks[1].ffn
    assert moe.capacity_factor == 1.0
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


# ----------------------------------------------------------------------------- mirror
def mirror_steps(prefix: str) -> set[int]:
    from ecdit_dist.data.storage import S3Storage

    manager = CheckpointManager("unused", mirror=prefix)
    return set(manager.remote_steps(S3Storage()))


def train_mirrored(run, prefix, steps, *extra):
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    t = Trainer(load_config(TINY, [*QUIET, f"run.dir={run}", f"train.steps={steps}", "train.global_batch_size=8",
                                   "checkpoint.interval=1", f"checkpoint.mirror={prefix}", *extra]))
    t.checkpoints.s3_page_size = 4              # several listing pages even for a few checkpoints
    t.fit()
    return t


def test_mirror_retention_uses_the_remote_listing_and_a_prefix_has_one_owner(s3, tmp_path):
    from ecdit_dist.data.storage import S3Storage

    prefix = "s3://ckpt/owned"
    keep = ["checkpoint.keep_last=1", "checkpoint.keep_every=2"]
    train_mirrored(tmp_path / "a", prefix, 3, *keep)
    assert mirror_steps(prefix) == {2, 3}
    paged = S3Storage(page_size=2).list(prefix + "/")                     # listing pages agree
    assert [o.path for o in paged] == [o.path for o in S3Storage().list(prefix + "/")] and len(paged) > 6
    t = train_mirrored(tmp_path / "b", prefix, 5, *keep)                 # an empty machine restores from the mirror
    assert t.step == 5 and CheckpointManager(tmp_path / "b").committed_steps() == [4, 5]
    assert mirror_steps(prefix) == {2, 4, 5}                              # milestone 2 was never on machine b
    head = S3Storage().client.head_object(Bucket="ckpt", Key="owned/checkpoints/step-00000005/meta.json",
                                          ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")                                     # uploaded with a server-checked checksum
    from ecdit_dist.checkpoint.errors import CheckpointError

    with pytest.raises(CheckpointError, match="belongs to another run"):
        train_mirrored(tmp_path / "c", prefix, 1, "checkpoint.resume=false")
    assert mirror_steps(prefix) == {2, 4, 5}


def test_stopped_mirror_fails_or_continues_and_resumes_after_restart(s3, tmp_path):
    import ecdit_dist.data.storage as storage
    from ecdit_dist.checkpoint.errors import CheckpointError

    prefix = "s3://ckpt/stopping"
    real = storage.S3Storage.put_file
    stopped = []

    def stop_then_put(self, local, dest, *args):
        if "step-00000002" in dest and not stopped:
            s3.stop()                                                     # the server really goes away
            stopped.append(dest)
        return real(self, local, dest, *args)

    storage.S3Storage.put_file = stop_then_put
    try:
        with pytest.raises(CheckpointError, match=r"uploading step-00000002 .* failed.*mirror_required=false"):
            train_mirrored(tmp_path / "r", prefix, 3, "data.retries=2")
        assert CheckpointManager(tmp_path / "r").committed_steps() == [1, 2]   # committed locally first
        with pytest.warns(UserWarning, match="training goes on"):
            t = train_mirrored(tmp_path / "r", prefix, 3, "data.retries=2", "checkpoint.mirror_required=false")
        assert t.step == 3
    finally:
        storage.S3Storage.put_file = real
        if s3.proc is None:
            s3.start()
    owed = json.loads((tmp_path / "r" / "checkpoints" / ".mirror-pending.json").read_text())
    assert owed == ["step-00000002", "step-00000003"]                    # recorded in the run folder
    t = train_mirrored(tmp_path / "r", prefix, 4)
    assert t.step == 4 and mirror_steps(prefix) == {2, 3, 4}             # the resume uploaded what was owed
    assert not (tmp_path / "r" / "checkpoints" / ".mirror-pending.json").exists()


# ----------------------------------------------------------------------------- smaller items
def test_no_verify_skips_the_sha256_check(small_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    step = run / "checkpoints" / "step-00000002"
    shard = next(step.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    checked = cli_here(capsys, "convert", "inspect", step)
    assert checked.returncode == 2 and "does not match its sha256" in checked.stderr
    unchecked = cli_here(capsys, "convert", "inspect", step, "--no-verify", "--json")
    assert unchecked.returncode == 0, unchecked.stderr[-2000:]
    assert "verified_files" not in json.loads(unchecked.stdout)


def test_bad_numbers_and_a_local_mirror_are_refused(tmp_path, capsys):
    from ecdit_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="checkpoint.mirror must be s3://bucket/prefix"):
        load_config(TINY, ["checkpoint.mirror=/tmp/somewhere"])
    for args in (["data", "synth", "--out", tmp_path / "d", "--shard-rows", "0"],
                 ["train", "--nproc", "0", "--config", TINY],
                 ["sample", "--checkpoint", tmp_path, "--steps", "0"]):
        out = cli_here(capsys, *args)
        assert out.returncode == 2 and "must be at least 1, got 0" in out.stderr, (args, out.stderr[-1000:])
    assert not (tmp_path / "d").exists()


def test_s3_errors_hide_credentials_and_retries_do_not_multiply(monkeypatch):
    from workers import free_closed_port

    from ecdit_dist.data.storage import DataError, S3Storage

    port = free_closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user-key:very-secret@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage = S3Storage(retries=3, backoff_s=0.01)
    sent = []
    storage.client.meta.events.register("before-send.s3.*", lambda request, **kw: sent.append(request.url))
    with pytest.raises(DataError) as err:
        storage.list("s3://bucket/prefix/")
    assert "very-secret" not in str(err.value) and "user-key" not in str(err.value)
    assert len(sent) == 3                                               # ours, not 3 x botocore's


def test_metrics_drop_a_torn_line_and_steps_logged_after_the_checkpoint(tmp_path):
    from ecdit_dist.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                    for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    logger = MetricsLogger(tmp_path, True, False, after_step=3)            # resumed from step 3
    logger.log(4, {"loss": 0.5})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]


def test_steps_beyond_eight_digits_resume(tmp_path):
    manager = CheckpointManager(tmp_path)
    state = {"model": {"w": torch.randn(3)}, "trainer": {"step": torch.tensor(123_456_789)}}
    manager.save(123_456_789, state, {"config": {}, "contents": ["model", "trainer"]})
    manager.save(99_999_999, state, {"config": {}, "contents": ["model", "trainer"]})
    assert manager.committed_steps() == [99_999_999, 123_456_789]
    assert manager.latest_valid().name == "step-123456789"


# ----------------------------------------------------------------------------- atomic exports
def test_reexport_is_refused_or_replaces_whole_and_a_crash_keeps_the_old_export(small_run, tmp_path):
    import textwrap

    from ecdit_dist.checkpoint import convert as C
    from ecdit_dist.checkpoint.tensors import ConvertError

    out = tmp_path / "export"
    C.export(small_run, out, max_shard_size="100KB")
    sharded = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors.index.json" in sharded and len(sharded) > 3
    with pytest.raises(ConvertError, match="exists and is not empty.*--overwrite"):
        C.export(small_run, out, max_shard_size="0")
    refused = cli("convert", "export", "--checkpoint", small_run, "--out", out)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == sharded

    crash = textwrap.dedent(f"""
        import os
        import ecdit_dist.checkpoint.tensors as T
        import ecdit_dist.checkpoint.convert as C
        real, calls = T.DCPSource.extents, []
        def dying(self, name):
            calls.append(name)
            if len(calls) == 5:
                os._exit(9)                      # killed in the middle of writing the new export
            return real(self, name)
        T.DCPSource.extents = dying              # asked once per tensor as it is written
        C.export({str(small_run)!r}, {str(out)!r}, max_shard_size="0", overwrite=True)
    """)
    died = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == sharded      # the old export, intact

    C.export(small_run, out, max_shard_size="0", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]   # replaced whole
