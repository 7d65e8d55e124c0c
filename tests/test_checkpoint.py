"""Checkpoints: commit protocol, corruption, resume under other layouts, and the converters."""

import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecdit_dist.checkpoint import convert as C
from ecdit_dist.checkpoint.manager import CheckpointError, CheckpointManager, verify_checkpoint
from ecdit_dist.checkpoint.tensors import ConvertError
from ecdit_dist.config import load_config
from ecdit_dist.metrics import read_metrics
from ecdit_dist.parallel.local import run_ranks
from ecdit_dist.train import Trainer
from workers import EQUIV, QUIET, TINY, copy_run, crash_during_commit, deepspeed_checkpoint, jobs, train_layout

ROOT = Path(__file__).resolve().parents[1]


def train(run_dir, *overrides, steps=2):
    t = Trainer(load_config(TINY, [f"run.dir={run_dir}", f"train.steps={steps}", *QUIET, *overrides]))
    t.fit()
    return t


def model_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# ----------------------------------------------------------------------------- commit protocol
def test_async_save_resumes_exactly(tmp_path):
    straight = train(tmp_path / "a", "train.global_batch_size=16", steps=6)
    train(tmp_path / "b", "train.global_batch_size=16", "checkpoint.interval=2", "checkpoint.async_save=true",
          steps=4)
    assert sorted(CheckpointManager(tmp_path / "b").committed_steps()) == [2, 4]
    resumed = train(tmp_path / "b", "train.global_batch_size=16", steps=6)
    a, b = model_state(straight), model_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_while_writing_leaves_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(AssertionError, match="exit codes"):
        run_ranks(crash_during_commit, 1, tmp_path / "ranks", str(run), timeout=240)
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp-step-00000002").is_dir()              # the interrupted save
    assert CheckpointManager(run).committed_steps() == [1]
    assert (ckpts / "latest").read_text().strip() == "step-00000001"
    t = Trainer(load_config(TINY, [f"run.dir={run}", "train.steps=3", "logging.interval=1", *QUIET]))
    t.fit()                                                       # resumes from step 1, ignores the partial one
    assert [r["step"] for r in read_metrics(run)][-2:] == [2, 3]
    assert not (ckpts / ".tmp-step-00000002").exists()            # cleaned up by the next commit
    assert sorted(CheckpointManager(run).committed_steps()) == [1, 3]


def test_flipped_byte_and_missing_manifest_are_skipped_with_a_warning(tmp_path):
    run = tmp_path / "run"
    train(run, "checkpoint.interval=1", steps=3)
    newest = run / "checkpoints" / "step-00000003"
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (run / "checkpoints" / "step-00000002" / "manifest.json").unlink()
    with pytest.warns(UserWarning) as record:
        found = CheckpointManager(run).latest_valid()
    assert found.name == "step-00000001"
    messages = " | ".join(str(w.message) for w in record)
    assert "step-00000003" in messages and "does not match its sha256" in messages
    assert "step-00000002" in messages and "no manifest.json" in messages
    out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "convert", "inspect", str(newest)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does not match its sha256" in out.stderr


def test_manifest_paths_cannot_escape(tmp_path):
    run = tmp_path / "run"
    train(run, steps=1)
    folder = run / "checkpoints" / "step-00000001"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../outside"] = {"size": 1, "sha256": "0"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        verify_checkpoint(folder)


# ----------------------------------------------------------------------------- layouts
def test_resume_under_other_layouts(tmp_path):
    """Saved on dp_shard 2 x tp 2 x ep 2; resumed on 1 rank, dp4 x ep4 and tp2: same trajectory.
    The save, its copy and the dp4 x ep4 resume share one spawn of 4 ranks; 1 rank runs here."""
    common = [*EQUIV, "train.global_batch_size=16", "logging.interval=1"]
    ref = train(tmp_path / "ref", *common, steps=6)
    ref_losses = [r["loss"] for r in read_metrics(tmp_path / "ref")]
    saved = tmp_path / "saved"
    run_ranks(jobs, 4, tmp_path / "r4", [
        ("save tp2-ep2", train_layout, (str(saved), ["parallel.tp=2", "parallel.ep=2", *common], 3)),
        ("copy", copy_run, (str(saved), str(tmp_path / "dp4-ep4"))),
        ("resume dp4-ep4", train_layout, (str(tmp_path / "dp4-ep4"), ["parallel.ep=4", *common], 6))], timeout=600)
    assert CheckpointManager(saved).committed_steps() == [3]
    shutil.copytree(saved, tmp_path / "one")
    train_layout(0, 1, str(tmp_path / "one"), common, 6)
    shutil.copytree(saved, tmp_path / "tp2")
    run_ranks(train_layout, 2, tmp_path / "r-tp2", str(tmp_path / "tp2"), ["parallel.tp=2", *common], 6, timeout=300)
    for name in ("one", "dp4-ep4", "tp2"):
        losses = [r["loss"] for r in read_metrics(tmp_path / name)]
        assert len(losses) == 6, name
        assert losses == pytest.approx(ref_losses, rel=1e-5), name
    del ref


# ----------------------------------------------------------------------------- converters
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    t = train(run, "checkpoint.interval=2", steps=4)
    return run, model_state(t), {k: v.clone() for k, v in t.ema.shadow.items()}


def test_export_import_roundtrip_is_bit_exact(trained, tmp_path):
    run, state, ema = trained
    out = tmp_path / "export"
    C.export(run, out, max_shard_size="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = {}
    for f in out.glob("*.safetensors"):
        loaded.update(load_file(f))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["preset"] == "tiny" and config["step"] == 4

    C.export(run, tmp_path / "ema", ema=True, max_shard_size="0")
    ema_loaded = load_file(tmp_path / "ema" / "model.safetensors")
    assert all(torch.equal(ema_loaded[k], ema[k]) for k in ema)
    C.export(run, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="0")
    assert load_file(tmp_path / "bf16" / "model.safetensors")["final.linear.weight"].dtype == torch.bfloat16

    C.import_(out, tmp_path / "imported")
    t = Trainer(load_config(TINY, [f"run.dir={tmp_path / 'imported'}", "train.steps=1", *QUIET]))
    assert t.resume() and t.step == 0
    now = model_state(t)
    assert all(torch.equal(now[k], state[k]) for k in state)
    t.train_step(0)                                              # trains on from the imported weights


def test_dry_run_writes_nothing(trained, tmp_path):
    run, _, _ = trained
    plan = C.export(run, tmp_path / "x", dry_run=True)
    assert plan["tensors"] > 50 and not (tmp_path / "x").exists()
    out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "convert", "merge", str(run), str(run),
                          "--out", str(tmp_path / "y"), "--dry-run", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["weights"] == [0.5, 0.5] and not (tmp_path / "y").exists()


def test_merge_identity_and_weights(trained, tmp_path):
    run, state, _ = trained
    C.export(run, tmp_path / "a", max_shard_size="0")
    C.merge([run, tmp_path / "a"], tmp_path / "same", max_shard_size="0")
    merged = load_file(tmp_path / "same" / "model.safetensors")
    assert all(torch.equal(merged[k], state[k]) for k in state)           # identical inputs: identity

    other = {k: v + torch.randn_like(v) for k, v in state.items()}
    (tmp_path / "b").mkdir()
    save_file(other, tmp_path / "b" / "model.safetensors")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    patterns = tmp_path / "tw.json"
    patterns.write_text(json.dumps({"blocks.1.ffn.*": [0.0, 1.0]}))
    C.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "w", weights=[0.25, 0.75],
            tensor_weights=json.loads(patterns.read_text()), max_shard_size="0")
    w = load_file(tmp_path / "w" / "model.safetensors")
    name = "blocks.0.attn.q_proj.weight"
    expect = (0.25 * state[name].double() + 0.75 * other[name].double()).float()
    assert torch.equal(w[name], expect)
    assert torch.equal(w["blocks.1.ffn.router.weight"], other["blocks.1.ffn.router.weight"])


def test_converters_name_missing_leftover_and_misshaped_tensors(trained, tmp_path):
    run, state, _ = trained
    C.export(run, tmp_path / "good", max_shard_size="0")
    cfg = (tmp_path / "good" / "config.json").read_text()

    def variant(name, tensors):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        (d / "config.json").write_text(cfg)
        return d

    missing = variant("missing", {k: v for k, v in state.items() if k != "final.linear.bias"})
    with pytest.raises(ConvertError, match="1 missing: final.linear.bias"):
        C.import_(missing, tmp_path / "r1")
    extra = variant("extra", {**state, "blocks.9.bogus": torch.zeros(2)})
    with pytest.raises(ConvertError, match="1 unexpected: blocks.9.bogus"):
        C.merge([extra], tmp_path / "m")
    bad = variant("bad", {**state, "patch_embed.weight": torch.zeros(3, 3)})
    with pytest.raises(ConvertError, match=r"patch_embed.weight: \(3, 3\) \(expected \(128, 32\)\)"):
        C.import_(bad, tmp_path / "r2")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists() and not (tmp_path / "m").exists()
    evil = variant("evil", state)
    (evil / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(ConvertError, match="outside the folder"):
        C.inspect(evil)
    trunc = variant("trunc", state)
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ConvertError, match="not a readable safetensors file"):
        C.inspect(trunc)


def test_upcycled_layer_is_gate_sum_times_dense_ffn(tmp_path):
    seed = random.SystemRandom().randrange(2**31)
    dense_run = tmp_path / "dense"
    dense = train(dense_run, "model.preset=tiny-dense", "moe.num_experts=0", steps=1)
    C.upcycle(dense_run, tmp_path / "up", num_experts=4, noise=0.0, seed=seed, max_shard_size="0")
    up = load_file(tmp_path / "up" / "model.safetensors")
    config = json.loads((tmp_path / "up" / "config.json").read_text())
    assert config["moe"]["num_experts"] == 4 and config["moe"]["router"] == "expert_choice"

    moe_model = C.load_model(tmp_path / "up", dtype=torch.float64)
    assert len(up) == len(moe_model.state_dict())
    dense_model = dense.model.double()
    layer, ffn = moe_model.blocks[1].ffn, dense_model.blocks[1].ffn
    for name, t in dense_model.state_dict().items():          # everything else is copied unchanged
        if not (name.startswith(("blocks.1.", "blocks.3.")) and ".ffn." in name):
            assert torch.equal(moe_model.state_dict()[name], t), name
    torch.manual_seed(seed)
    x = torch.randn(4, 32, 128, dtype=torch.float64)
    out = layer(x).reshape(-1, 128)
    gate, rows = layer.route(x.reshape(-1, 32, 128), 16)
    gate_sum = torch.zeros(out.shape[0], dtype=torch.float64).index_add_(0, rows.reshape(-1), gate.reshape(-1).double())
    expected = gate_sum[:, None] * ffn(x).reshape(-1, 128)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)
    with pytest.raises(ConvertError, match="already has 4 experts"):
        C.upcycle(tmp_path / "up", tmp_path / "again", num_experts=8)


def test_export_peak_memory_stays_near_the_largest_tensor(tmp_path):
    """A ~600 MB checkpoint exported in a child process: its peak RSS grows by far less than the model."""
    from ecdit_dist.config import config_from_dict
    from ecdit_dist.model import ECDiT

    raw = {"model": {"preset": "tiny", "hidden_dim": 512, "num_layers": 16, "num_heads": 8, "num_kv_heads": 4},
           "moe": {"num_experts": 6}}
    cfg = config_from_dict(raw, validate=False)
    model = ECDiT(cfg.model, cfg.moe)
    state = model.state_dict()
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    assert model_bytes > 550e6 and largest < model_bytes / 20
    CheckpointManager(tmp_path / "big").save(1, {"model": state, "trainer": {"step": torch.tensor(1)}},
                                             {"config": cfg.to_dict(), "contents": ["model", "trainer"]})
    del model, state
    # VmHWM (peak RSS) restarts at exec; ru_maxrss would keep this test process's own peak
    probe = textwrap.dedent(f"""
        import re, sys
        def hwm():
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        import ecdit_dist.checkpoint.convert as C
        import torch
        base = hwm()
        C.export({str(tmp_path / 'big')!r}, {str(tmp_path / 'out')!r}, max_shard_size="64MB")
        print(base, hwm())
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    base, peak = map(int, out.stdout.split())
    grown = peak - base
    assert grown > largest                            # the probe does see the export's memory
    assert grown < 0.35 * model_bytes, (grown, model_bytes, largest)
    assert sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) > model_bytes


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_checkpoint_to_consolidated(stage, tmp_path):
    weights = run_ranks(deepspeed_checkpoint, 2, tmp_path / "ranks", str(tmp_path / "ds"), stage, timeout=400)[0]
    C.from_deepspeed(tmp_path / "ds", tmp_path / "out", TINY, max_shard_size="0")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == weights.keys()
    for k in weights:
        assert torch.equal(got[k], weights[k].float()), k
    model = C.load_model(tmp_path / "out")
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in weights.values())
