"""configs/paper/: one config per Table 1 model for the paper's training run, each with a
cluster layout that validates for its stated world size and builds with Table 1's counts."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ecdit_dist.config import ConfigError, load_config
from ecdit_dist.params import count_params
from ecdit_dist.parallel.dims import ParallelDims
from ecdit_dist.presets import PAPER_TABLE1

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
GPU_MEMORY = 80e9
STATE_BYTES_PER_PARAM = 20   # fp32 weights, gradients, RMSProp square average and momentum, EMA


def test_one_config_per_table1_model():
    assert sorted(p.stem for p in PAPER) == sorted(PAPER_TABLE1)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_validates_and_builds_with_table1_counts(path):
    cfg = load_config(path)
    assert cfg.model.preset == path.stem
    # the paper's run (section 4, training details)
    assert (cfg.train.global_batch_size, cfg.train.steps) == (4096, 800_000)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule) == ("rmsprop", 1e-4, 20_000,
                                                                                           "constant")
    assert cfg.optim.momentum > 0                                     # RMSProp *with momentum*
    assert cfg.model.mask_ratio == 0.5 and cfg.model.train_tokens_per_image == 128
    assert (cfg.train.precision, cfg.train.activation_checkpointing) == ("bf16", True)
    if cfg.moe.num_experts:
        assert (cfg.moe.group_size, cfg.moe.eval_group_size, cfg.moe.capacity_factor) == (1024, 512, 2.0)
        assert cfg.moe.eval_group_size == 2 * cfg.model.tokens_per_image   # two images per inference group
    # the stated cluster: "N nodes x G GPUs" in the header equals parallel.world_size
    nodes, gpus = map(int, re.search(r"Cluster: (\d+) nodes x (\d+) GPUs", path.read_text()).groups())
    world = cfg.parallel.world_size
    assert nodes * gpus == world
    dims = ParallelDims.from_config(cfg, world)
    assert f"dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x tp {dims.tp}, ep {dims.ep}." \
        in path.read_text()
    with pytest.raises(ConfigError, match=f"parallel.world_size={world}"):
        ParallelDims.from_config(cfg, world // 2)
    # Table 1, built on the meta device (same tolerance as tests/test_params.py)
    total, activated = PAPER_TABLE1[path.stem]
    counts = count_params(cfg.model, cfg.moe)
    assert abs(counts["total_params"] / total - 1) <= 0.03, (counts["total_params"], total)
    assert abs(counts["activated_params"] / activated - 1) <= 0.03, (counts["activated_params"], activated)


# The layouts whose expert all-to-all leaves a node, the one with the most state per rank,
# and the largest dense model.
SHARDED = ["ecdit-m-64e", "ecdit-3xl-32e", "ecdit-3xl-16e", "ecdit-xxl-32e", "dense-m"]


@pytest.mark.slow
def test_big_layouts_shard_as_stated():
    """Parallelize each meta model as rank 0 of its stated world (torch's fake process group)
    and check what that rank really holds against the layout's claims."""
    paths = [str(ROOT / "configs" / "paper" / f"{name}.yaml") for name in SHARDED]
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_world.py"), *paths],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    views = json.loads(out.stdout)
    for path in paths:
        cfg, view = load_config(path), views[path]
        p, m = cfg.parallel, cfg.model
        assert view["global_params"] == count_params(m, cfg.moe)["backbone_params"]
        # dense weights: ZeRO-3 over dp_shard along dim 0, replicated over dp_replicate
        d = m.hidden_dim
        assert view["dense"]["global"][0] == d and view["dense"]["local"][0] == -(-d // p.dp_shard)
        if cfg.moe.num_experts:
            E = cfg.moe.num_experts
            # each rank owns E / ep whole experts, never sharded further (expert-data-parallel 1)
            assert view["edp"] == 1
            assert view["expert"]["global"] == [E, d, m.ffn_hidden]
            assert view["expert"]["local"] == [E // p.ep, d, m.ffn_hidden]
            assert view["expert"]["mesh_shape"][-1] == p.ep
        state = view["local_params"] * STATE_BYTES_PER_PARAM
        stated = float(re.search(r"Model state per rank: ([\d.]+) GB", Path(path).read_text()).group(1))
        assert abs(state / 1e9 - stated) < 0.1, (path, state / 1e9, stated)
        assert state < 0.5 * GPU_MEMORY, (path, state / 1e9)      # half of each GPU left for activations
