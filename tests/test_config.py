"""Config loading: overrides, presets, and errors that name the key and what would be valid."""

from pathlib import Path

import pytest

from ecdit_dist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def test_tiny_config_loads_with_overrides():
    cfg = load_config(TINY, ["train.steps=7", "optim.lr=3e-4", "run.dir=/tmp/x", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 3e-4 and cfg.run.dir == "/tmp/x"
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.preset == "tiny" and cfg.model.hidden_dim == 128  # filled from the preset
    assert cfg.moe.num_experts == 4


def test_explicit_keys_override_the_preset():
    cfg = load_config(None, ["model.preset=ecdit-xl-8e", "model.num_layers=4"])
    assert cfg.model.hidden_dim == 1152 and cfg.model.num_layers == 4 and cfg.moe.num_experts == 8


@pytest.mark.parametrize("override,pattern", [
    (["model.hiden_dim=64"], r"unknown key 'model.hiden_dim'; did you mean 'model.hidden_dim'"),
    (["bogus.key=1"], r"unknown key 'bogus'"),
    (["train.steps=ten"], r"train.steps must be an integer, got str"),
    (["train.steps=1.5"], r"train.steps must be an integer"),
    (["logging.tensorboard=3"], r"logging.tensorboard must be true or false"),
    (["optim.name=sgd"], r"optim.name must be one of 'rmsprop', 'adamw'; got 'sgd'"),
    (["model.num_kv_heads=3"], r"model.num_heads \(4\) must be divisible by model.num_kv_heads \(3\); valid kv heads: \[1, 2, 4\]"),
    (["moe.capacity_factor=0"], r"moe.capacity_factor must be > 0"),
    (["moe.capacity_factor=0.05"], r"expert capacity moe.group_size \* moe.capacity_factor / moe.num_experts .* below 1 token"),
    (["moe.capacity_factor=8"], r"moe.capacity_factor \(8.0\) must be <= moe.num_experts \(4\)"),
    (["moe.group_size=48"], r"moe.group_size \(48\) must divide the tokens each rank routes: micro batch 32 x 32 tokens/image / tp 1 = 1024; valid group sizes"),
    (["model.preset=huge"], r"unknown model.preset 'huge'; valid presets: dense-xl"),
    (["train.steps"], r"must look like section.key=value"),
    (["train.global_batch_size=30", "train.micro_batch_size=4"], r"train.micro_batch_size \(4\) must divide the per-rank batch 30"),
    (["model.mask_ratio=1.0"], r"model.mask_ratio must be in \[0, 1\)"),
    (["data.image_size=64"], r"set data.image_size=32"),
])
def test_invalid_values_fail_with_a_message_naming_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(TINY, override)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        load_config(scalar)


def test_layout_validation_names_the_fix():
    cfg = load_config(TINY)
    with pytest.raises(ConfigError, match="global_batch_size \\(32\\) must be divisible by the data-parallel size 3"):
        cfg.validate(dp=3)
    cfg.validate(dp=4, tp=2)  # the tiny config admits dp4 with tp2
