"""Parameter counts of every Table 1 preset against the paper, and their internal structure."""

import json
import subprocess
import sys

import pytest

from ecdit_dist.config import config_from_dict
from ecdit_dist.params import count_params
from ecdit_dist.presets import BACKBONES, PAPER_TABLE1, PRESETS


def counts(name):
    cfg = config_from_dict({"model": {"preset": name}}, validate=False)
    return cfg, count_params(cfg.model, cfg.moe)


@pytest.mark.parametrize("name", list(PAPER_TABLE1))
def test_table1_within_3_percent(name):
    total, activated = PAPER_TABLE1[name]
    _, c = counts(name)
    assert abs(c["total_params"] / total - 1) <= 0.03, (name, c["total_params"], total)
    assert abs(c["activated_params"] / activated - 1) <= 0.03, (name, c["activated_params"], activated)


@pytest.mark.parametrize("backbone", ["xl", "xxl", "3xl"])
def test_expert_count_differences_are_exact(backbone):
    cfg, dense = counts(f"dense-{backbone}")
    d, h = cfg.model.hidden_dim, cfg.model.ffn_hidden
    ffn = 2 * d * h                       # one expert = one dense FFN (w1 + w2)
    moe_layers = cfg.model.num_layers // 2
    prev_e, prev = None, None
    for e in (8, 16, 32):
        _, c = counts(f"ecdit-{backbone}-{e}e")
        assert c["moe_layers"] == moe_layers
        # dense -> E experts: (E - 1) more FFNs and one router (E x d) per MoE layer
        assert c["total_params"] - dense["total_params"] == moe_layers * ((e - 1) * ffn + e * d)
        # activated = dense + (capacity_factor - 1) x FFN per MoE layer, + the router
        assert c["activated_params"] == dense["activated_params"] + moe_layers * (ffn + e * d)
        if prev is not None:
            assert c["total_params"] - prev["total_params"] == moe_layers * (e - prev_e) * (ffn + d)
        prev_e, prev = e, c


def test_m_configs_have_46_and_38_layers():
    dense_cfg, _ = counts("dense-m")
    moe_cfg, c = counts("ecdit-m-64e")
    assert dense_cfg.model.num_layers == 46 and moe_cfg.model.num_layers == 38
    assert c["moe_layers"] == 19 and moe_cfg.moe.num_experts == 64


def test_token_choice_baselines_activate_top2():
    _, ec = counts("ecdit-xl-16e")
    _, gs = counts("gs-xl-16e")
    assert gs["total_params"] == ec["total_params"]
    assert gs["activated_params"] == ec["activated_params"]   # top-2 = capacity factor 2
    assert PRESETS["gs-xxl-32e"]["moe"]["router"] == "token_choice"


def test_heads_match_table1():
    for b, arch in BACKBONES.items():
        cfg, _ = counts(f"dense-{b}")
        assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.hidden_dim) == \
            (arch["num_heads"], arch["num_kv_heads"], arch["hidden_dim"])
        assert cfg.model.head_dim == 64


def test_params_cli_json_builds_on_meta_device():
    out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "params", "--preset", "ecdit-m-64e", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert abs(data["total_params"] / 97.21e9 - 1) < 0.03
    assert abs(data["activated_params"] / 8.27e9 - 1) < 0.03
    assert data["frozen_text_encoder_params"] == 670_000_000


def test_params_cli_rejects_unknown_preset():
    out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "params", "--preset", "nope"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown model.preset 'nope'" in out.stderr
