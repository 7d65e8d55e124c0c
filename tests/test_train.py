"""Single-process training: the loss falls, resume is exact, checkpoints and samples are written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecdit_dist.checkpoint.manager import verify_checkpoint
from ecdit_dist.config import load_config
from ecdit_dist.device import _glibc
from ecdit_dist.metrics import read_metrics
from ecdit_dist.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "sample.at_end=false"]


def test_tiny_run_loss_falls(tmp_path):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "train.steps=120", "logging.interval=10",
                             "checkpoint.interval=0", *QUIET])
    trainer = Trainer(cfg)
    trainer.fit()
    # a CPU run keeps freed host blocks for the next step (train.host_memory=auto)
    assert trainer.host_memory == ("reuse" if _glibc() else "release (not glibc)")
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, losses


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("overrides", [[], ["moe.router=token_choice", "optim.name=rmsprop", "train.micro_batch_size=8"]])
def test_resume_is_bitwise_exact(tmp_path, overrides):
    common = ["train.global_batch_size=16", "logging.interval=1", *QUIET, *overrides]
    straight = Trainer(load_config(TINY, [f"run.dir={tmp_path / 'a'}", "train.steps=8", *common]))
    straight.fit()

    first = Trainer(load_config(TINY, [f"run.dir={tmp_path / 'b'}", "train.steps=5", *common]))
    first.fit()
    resumed = Trainer(load_config(TINY, [f"run.dir={tmp_path / 'b'}", "train.steps=8", *common]))
    resumed.fit()
    assert resumed.step == 8
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in straight.ema.shadow.items():
        assert torch.equal(v, resumed.ema.shadow[k]), k
    la = [r["loss"] for r in read_metrics(tmp_path / "a")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b")]
    assert la == lb                      # steps 1-5 from the first run, 6-8 after the resume


def test_checkpoints_and_sample_grid(tmp_path):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "train.steps=6", "checkpoint.interval=2",
                             "checkpoint.keep_last=2", "logging.progress=false", "sample.steps=3",
                             "sample.per_prompt=2"])
    Trainer(cfg).fit()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000004", "step-00000006"]          # keep_last=2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    manifest = verify_checkpoint(tmp_path / "checkpoints" / "step-00000006")
    assert ".metadata" in manifest["files"] and "meta.json" in manifest["files"]
    png = tmp_path / "samples" / "step-00000006.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").iterdir())                      # TensorBoard events
    assert (tmp_path / "config.yaml").exists()

    out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "sample", "--checkpoint", str(tmp_path),
                          "--prompt", "two blue squares at the bottom right", "--per-prompt", "3",
                          "--steps", "2", "--out", str(tmp_path / "cli.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_another_architecture(tmp_path):
    Trainer(load_config(TINY, [f"run.dir={tmp_path}", "train.steps=2", *QUIET])).fit()
    t = Trainer(load_config(TINY, [f"run.dir={tmp_path}", "train.steps=4", "moe.num_experts=2", *QUIET]))
    with pytest.raises(Exception, match="architecture differs.*moe.num_experts"):
        t.fit()


def test_train_cli_reports_config_errors():
    out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "train", "--config", str(TINY),
                          "--set", "moe.group_size=48"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "moe.group_size (48) must divide" in out.stderr
    help_out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "train", "--help"],
                              capture_output=True, text=True, timeout=300)
    assert help_out.returncode == 0 and "--set" in help_out.stdout
