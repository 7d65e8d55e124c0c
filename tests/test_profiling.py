"""Profiling: `ecdit profile a2a`, step timers, traces, routing heatmaps (CPU, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecdit_dist.config import load_config
from ecdit_dist.metrics import read_metrics
from ecdit_dist.parallel.local import run_ranks
from ecdit_dist.profiling.a2a import dispatch_shape
from ecdit_dist.profiling.phases import PHASES

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ecdit_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def _measured_dispatch_bytes(cfg, micro: int, tp: int) -> int:
    """Bytes of the buffer the first MoE layer of the real model hands to its experts (the EP
    dispatch input) in one training forward of `micro` masked images, on one of `tp` ranks."""
    from ecdit_dist.model import ECDiT
    from ecdit_dist.model.moe import ExpertChoiceMoE

    torch.manual_seed(0)
    model = ECDiT(cfg.model, cfg.moe)
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, ExpertChoiceMoE))
    layer.experts.register_forward_pre_hook(lambda m, a: seen.append(a[0].numel() * a[0].element_size()))
    m = cfg.model
    S, keep_n = m.tokens_per_image, m.train_tokens_per_image
    keep = torch.stack([torch.randperm(S)[:keep_n] for _ in range(micro)])
    with torch.no_grad():
        h = torch.randn(micro, keep_n // tp, m.hidden_dim)   # a tp rank routes its 1/tp share of the tokens
        layer(h)
        model(torch.randn(micro, m.in_channels, m.latent_size, m.latent_size), torch.rand(micro),
              torch.randn(micro, m.text_len, m.text_dim), torch.ones(micro, m.text_len, dtype=torch.bool), keep=keep)
    assert len(seen) == 2
    if tp == 1:
        assert seen[1] == seen[0]                             # the whole model sends what the layer alone sends
    return seen[0]


@pytest.mark.parametrize("tp", [1, 2])
def test_preset_size_is_the_dispatch_buffer_the_model_sends(tp):
    cfg = load_config(TINY)
    for micro in (2, 8):
        shape = dispatch_shape(cfg, tp, micro, 4)
        assert shape.bytes_per_rank == _measured_dispatch_bytes(cfg, micro, tp)


@pytest.mark.parametrize("ep", [2, 4])
def test_profile_a2a_cli(tmp_path, ep):
    out, png = tmp_path / "a2a.json", tmp_path / "a2a.png"
    args = ["profile", "a2a", "--nproc", "4", "--ep", str(ep), "--iters", "2", "--warmup", "1",
            "--json", str(out), "--plot", str(png)]
    args += ["--preset", "tiny"] if ep == 2 else ["--sizes", "4K,64K"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["group_size"] == ep and res["world"] == 4 and res["groups"] == 4 // ep
    rows = res["rows"]
    kinds = {}
    for row in rows:
        assert set(row) >= {"bytes_per_rank", "time_s", "time_p10_s", "time_p90_s", "algbw_GBps", "busbw_GBps", "kind"}
        assert row["kind"] in ("raw", "ecdit")
        kinds.setdefault(row["bytes_per_rank"], set()).add(row["kind"])
        assert row["algbw_GBps"] == pytest.approx(row["bytes_per_rank"] / row["time_s"] / 1e9, rel=1e-9)
        assert row["busbw_GBps"] / row["algbw_GBps"] == pytest.approx((ep - 1) / ep, rel=1e-9)
        assert row["time_p10_s"] <= row["time_s"] <= row["time_p90_s"]
        assert 0 < row["time_rank_min_s"] <= row["time_rank_max_s"]
        assert row["samples"] == 2 * 2
    assert all(k == {"raw", "ecdit"} for k in kinds.values())
    if ep == 2:
        # the preset's size: one dispatch of a 4-rank data-parallel micro-batch (32 / 4 = 8 images)
        cfg = load_config(TINY)
        assert list(kinds) == [_measured_dispatch_bytes(cfg, 8, 1)] == [res["dispatch"]["bytes_per_rank"]]
    else:
        # requested sizes rounded down to whole (E, T, d) buffers: E = n = 4 experts, d = 1024, fp32
        assert list(kinds) == [4 * 1 * 1024 * 4, 4 * 4 * 1024 * 4]
    for line in ("busbw", "raw", "ecdit"):
        assert line in r.stdout
    from PIL import Image

    assert Image.open(png).size == (640, 400)


def test_profile_a2a_rejects_bad_layout():
    r = _cli("profile", "a2a", "--nproc", "4", "--ep", "3", "--preset", "tiny", timeout=120)
    assert r.returncode == 2 and "--ep 3 must divide the number of ranks 4" in r.stderr


def test_training_timers_trace_and_no_effect_on_loss(tmp_path):
    from profiling_workers import timers_on_off

    from ecdit_dist.cli import main
    from ecdit_dist.profiling.timeline import phase_ranges

    overrides = ["parallel.tp=2", "parallel.ep=2"]
    results = run_ranks(timers_on_off, 4, tmp_path / "ranks", str(tmp_path), overrides, timeout=600)
    on, off = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert [r["loss"] for r in on] == [r["loss"] for r in off]             # timers change no loss
    assert all(f"time/{p}_ms" in r and f"time/{p}_share" in r for r in on for p in PHASES)
    assert not any(k.startswith("time/") for r in off for k in r)
    for res in results:
        t, wall = res["timed"], res["wall"]
        step = t["time/step_ms"] / 1000
        assert abs(step - wall) <= 0.1 * wall, (step, wall)                 # the timer's step is the real step
        named = sum(t[f"time/{p}_ms"] for p in PHASES) / 1000
        assert named <= step * (1 + 1e-9)                                   # exclusive: nothing counted twice
        assert named + t["time/other_ms"] / 1000 == pytest.approx(step, rel=1e-6)
        for p in PHASES:                                                    # every phase of this layout was seen
            assert t[f"time/{p}_ms"] > 0, p
    for rank in range(4):
        trace = tmp_path / "on" / "traces" / "steps-00000002-00000002" / f"rank{rank:05d}.json"
        events = json.loads(trace.read_text())["traceEvents"]
        names = {e.get("name") for e in events}
        for name in ("step2", "layer0/attention", "layer1/route", "layer1/dispatch_a2a", "layer1/experts",
                     "layer1/combine_a2a", "layer1/experts@bwd", "layer1/dispatch_a2a@bwd", "optimizer"):
            assert name in names, name
        assert any(n and n.endswith("/fsdp_gather") for n in names)
        assert any(n and n.endswith("/fsdp_reduce") for n in names)
        ranges, t0, t1 = phase_ranges(json.loads(trace.read_text()))            # what `profile timeline` draws
        assert {p for p, _, _ in ranges} == set(PHASES)
        assert all(t0 <= a <= b <= t1 for _, a, b in ranges)
    assert main(["profile", "timeline", str(trace), "--out", str(tmp_path / "timeline.png")]) == 0
    assert not (tmp_path / "off" / "traces").exists()


def _reference_counts(tokens: torch.Tensor, layer) -> torch.Tensor:
    """Experts per token recomputed from the layer's input: softmax router affinities, then every
    expert's top-C tokens of each group (independent of ecdit_dist.model.routing)."""
    g = layer.eval_group_size
    C = -(-int(g * layer.capacity_factor) // layer.num_experts)
    x = tokens.reshape(-1, g, tokens.shape[-1]).float()                       # (G, g, d)
    affinity = torch.softmax(torch.nn.functional.linear(x, layer.router.weight.float()), dim=-1)  # (G, g, E)
    top = affinity.topk(C, dim=1).indices                                     # (G, C, E): tokens per expert
    counts = torch.zeros(x.shape[0], g)
    counts.scatter_add_(1, top.reshape(x.shape[0], -1), torch.ones(x.shape[0], top[0].numel()))
    return counts.reshape(-1)


def test_routing_heatmaps_and_training_histograms(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ecdit_dist.cli import main
    from ecdit_dist.inference import load_for_sampling
    from ecdit_dist.profiling.plot import colour
    from ecdit_dist.sample import generate
    from ecdit_dist.train import Trainer

    run = tmp_path / "run"
    cfg = load_config(TINY, [f"run.dir={run}", "train.steps=2", "logging.interval=1", "train.global_batch_size=8",
                             "logging.progress=false", "sample.at_end=false"])
    Trainer(cfg).fit()

    # training: one histogram of experts per token per MoE layer and logged step, matching the layer's stats
    ea = EventAccumulator(str(run / "tb"), size_guidance={"histograms": 0})
    ea.Reload()
    metrics = read_metrics(run)
    for layer in (1, 3):
        hist = ea.Histograms(f"moe/layer{layer}/experts_per_token")
        assert [h.step for h in hist] == [1, 2]
        for h, m in zip(hist, metrics):
            v = h.histogram_value
            assert v.num == 8 * 32                                               # every routed token of the step
            assert v.sum / v.num == pytest.approx(m[f"moe/layer{layer}/experts_per_token_mean"])
            assert v.max == m[f"moe/layer{layer}/experts_per_token_max"]

    prompt, steps, buckets = "two blue squares at the bottom right", 4, 2
    out = tmp_path / "routing"
    assert main(["profile", "routing", "--checkpoint", str(run), "--prompt", prompt, "--steps", str(steps),
                 "--buckets", str(buckets), "--cfg-scale", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "routing.json").read_text())

    # independent reference: the same sampling run, the routing recomputed from each layer's inputs
    bundle = load_for_sampling(run)
    inputs = {}
    for i, block in enumerate(bundle.model.blocks):
        if block.is_moe:
            block.ffn.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0].clone()))
    emb, mask = bundle.text_encoder.encode([prompt])
    generate(bundle.model, emb, mask, steps, 1.0, 0)
    n, E = summary["grid"], summary["num_experts"]
    assert n * n == cfg.model.tokens_per_image and [e["layer"] for e in summary["layers"]] == [1, 3]

    png = Image.open(out / "routing.png").convert("RGB")
    fig = summary["figure"]
    assert list(png.size) == fig["size"] and len(fig["panels"]) == 2 * buckets
    cell = fig["cell"]
    for entry in summary["layers"]:
        layer = bundle.model.blocks[entry["layer"]].ffn
        ref = torch.stack([_reference_counts(x, layer)[: n * n] for x in inputs[entry["layer"]]])   # (steps, S)
        assert len(ref) == steps
        for b, stats in enumerate(entry["buckets"]):
            members = [s for s in range(steps) if s * buckets // steps == b]
            expect = ref[members].double().mean(0).view(n, n)
            shown = torch.tensor(stats["experts_per_token"], dtype=torch.float64)
            assert torch.equal(shown, expect)
            # one cell per latent token, coloured by its count
            x0, y0 = fig["panels"][f"{entry['layer']}/{b}"]
            for r in range(n):
                for c in range(n):
                    px = png.getpixel((x0 + c * cell + cell // 2, y0 + r * cell + cell // 2))
                    assert px == colour(float(expect[r, c]), E), (entry["layer"], b, r, c)
            # expert choice: every group of 64 tokens gets E * C = 128 picks: mean = f_c = 2 exactly
            assert stats["experts_per_token_mean"] == cfg.moe.capacity_factor == 2.0
            assert stats["experts_per_token_max"] == ref[members].max(1).values.double().mean().item()
            assert stats["unchosen_share"] == (ref[members] == 0).double().mean().item()
            # without guidance the batch is this one image, so the layer's own statistics agree
            for k in ("experts_per_token_mean", "experts_per_token_max", "unchosen_share"):
                assert stats["layer_stats"][k] == pytest.approx(stats[k], abs=1e-6)
