"""benchmarks/paper_claims.py: matched activated compute of the arms, and the whole pipeline
(train, measure, report) at its `test` setting."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import paper_claims as pc  # noqa: E402


def ecdit_params(config: Path) -> dict:
    """`ecdit params --config FILE --json`, run in this process."""
    from ecdit_dist.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["params", "--config", str(config), "--json"]) in (0, None)
    return json.loads(buf.getvalue())


def test_arms_have_matched_activated_compute():
    counts = {arm: ecdit_params(pc.CONFIG_DIR / f"{arm}.yaml") for arm in pc.ARMS}
    d, ffn, layers = 128, 512, 4            # the tiny preset, written out independently of the configs
    for arm in pc.ARMS:
        cfg = pc.arm_config(arm)
        assert (cfg.model.hidden_dim, cfg.model.num_layers) == (d, layers)
        if arm == "dense":
            assert cfg.moe.num_experts == 0 and cfg.model.ffn_hidden == 3 * ffn // 2
        else:
            assert cfg.model.ffn_hidden == ffn and cfg.moe.interval == 2
            per_token = cfg.moe.capacity_factor if cfg.moe.router == "expert_choice" else cfg.moe.top_k
            assert per_token == 2
            # what separates an MoE arm from the dense one is exactly its routers (d x E per MoE layer):
            # FFN weights + biases per token are the same, 2 x (2 x 512) + 2 x 512 = 4 x 768 hidden units
            routers = (layers // 2) * d * cfg.moe.num_experts
            assert counts[arm]["activated_params"] - counts["dense"]["activated_params"] == routers
            assert counts[arm]["total_params"] > counts["dense"]["total_params"]
    ratios = pc.check_matched_compute()
    assert ratios == {a: counts[a]["activated_params"] / counts["dense"]["activated_params"] for a in pc.ARMS}
    assert max(abs(r - 1) for r in ratios.values()) < pc.MATCH_TOLERANCE
    # the check fails when an arm is off: the dense arm at the MoE arms' FFN width
    off = {**pc.arm_params()}
    off["dense"] = ecdit_params_override("dense", ["model.ffn_dim=512"])
    with pytest.raises(AssertionError, match="not matched"):
        pc.check_matched_compute(off)


def ecdit_params_override(arm: str, overrides: list[str]) -> dict:
    from ecdit_dist.params import count_params

    cfg = pc.arm_config(arm, overrides)
    return count_params(cfg.model, cfg.moe)


def test_permutation_test_counts_relabelings():
    # 3 against 3: 20 relabelings; complete separation is the most extreme one
    assert pc.permutation_p([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(1 / 20)
    assert pc.permutation_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == 1.0
    assert pc.permutation_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    # one overlap: relabelings whose mean difference reaches the observed 2/3 (brute force by hand)
    assert pc.permutation_p([3.0, 5.0, 6.0], [1.0, 2.0, 4.0]) == pytest.approx(2 / 20)


def test_token_coverage_of_a_render():
    import numpy as np

    from ecdit_dist.data.shapes import BACKGROUND

    img = np.empty((1, 3, 32, 32), dtype=np.float32)
    img[:] = np.array(BACKGROUND, dtype=np.float32).reshape(1, 3, 1, 1)
    img[0, :, 4:8, 0:2] = 0.9                   # half of token (1, 0) in an 8x8 grid of 4x4 pixels
    cover = pc.token_coverage(img, 8)
    assert cover.shape == (1, 8, 8)
    assert cover[0, 1, 0] == 0.5 and cover.sum() == 0.5


def test_claims_pipeline_end_to_end(tmp_path):
    out = tmp_path / "claims"
    assert pc.main(["run", "--setting", "test", "--out", str(out), "--jobs", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    setting = pc.SETTINGS["test"]
    assert set(results["runs"]) == {f"{a}/seed{s}" for a in pc.ARMS for s in setting.seeds}
    for key, run in results["runs"].items():
        assert run["curve"]["step"][-1] == setting.steps and all(math.isfinite(v) for v in run["curve"]["loss"])
        assert math.isfinite(run["val_loss"]) and 0 <= run["geneval"]["overall"] <= 1
        assert ("aux_loss" in run["curve"]) == (run["arm"] == "gs-8e")
        if run["arm"] == "dense":
            assert run["routing"] is None
            continue
        for probe in (run["routing"], run["routing_init"]):
            for per_t in probe["layers"].values():
                for t, st in per_t.items():
                    if run["arm"].startswith("ec"):   # expert choice: exactly f_c experts per token on average
                        assert st["all_mean"] == pytest.approx(2.0)
                    else:                             # top-2 with a capacity: at most 2
                        assert st["all_mean"] <= 2.0
    # a second call finds every run done and trains nothing
    assert pc.main(["run", "--setting", "test", "--out", str(out), "--jobs", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]

    doc, img = tmp_path / "docs" / "REPRODUCTION.md", tmp_path / "docs" / "img" / "reproduction"
    assert pc.main(["report", "--results", str(out / "results.json"), "--doc", str(doc), "--img-dir", str(img)]) == 0
    text = doc.read_text()
    for heading in ("## Setup", "## Loss", "## mini-GenEval", "## Routing", "## Which claims held"):
        assert heading in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(p).name for p in links} == {"loss.png", "loss-second-half.png", "samples.png", "routing-ec-8e.png",
                                              "routing-ec-16e.png"}
    from PIL import Image

    for link in links:
        with Image.open(doc.parent / link) as im:
            assert im.format == "PNG" and im.width > 100
    for arm in pc.ARMS:
        # the loss table's validation loss is the mean over the arm's seeds in the results
        vals = [r["val_loss"] for r in results["runs"].values() if r["arm"] == arm]
        pattern = rf"^\| {re.escape(pc.LABELS[arm])} \| [0-9, ]+ \| [0-9.]+ ± [0-9.]+ \| ([0-9.]+) ± "
        row = re.search(pattern, text, re.M)
        assert row and float(row.group(1)) == pytest.approx(sum(vals) / len(vals), abs=1e-4)


def test_results_of_one_setting_merge(tmp_path):
    def part(name: str, setting: str, keys: list[str]) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"setting": setting, "settings": {"steps": len(setting)},
                                    "runs": {k: {"from": name} for k in keys}}))
        return str(path)

    a = part("a", "default", ["dense/seed0", "ec-8e/seed0"])
    b = part("b", "default", ["dense/seed1", "ec-8e/seed0"])
    merged = pc.merge_results([a, b])
    assert merged["runs"] == {"dense/seed0": {"from": "a"}, "ec-8e/seed0": {"from": "a"}, "dense/seed1": {"from": "b"}}
    with pytest.raises(ValueError, match="setting 'test'"):
        pc.merge_results([a, part("c", "test", ["dense/seed2"])])
