"""The paper's claims at a scale a CPU trains in minutes: expert choice against token choice and dense.

Four arms of the tiny EC-DiT (configs/claims/), all at the same activated compute per token
(checked from the parameter accounting before anything trains):

  dense   every FFN 768 wide (1.5 x 512): 4 x 768 = 2 x 512 + 2 MoE blocks x 2 experts x 512
  gs-8e   token-choice top-2 (GShard) with its load-balancing loss, 8 experts of 512
  ec-8e   expert choice, capacity factor 2 (2 experts per token on average), 8 experts of 512
  ec-16e  the same with 16 experts

Every arm trains on the same data, for the same steps, with the same seeds (a seed sets the
initial weights, the data order, noise, timesteps and token masks: the same for every arm).
Each run is then measured on its EMA weights:

* validation loss: the velocity MSE on 'val_images' held-out renders (all tokens, no masking),
  with fixed noise and timesteps at the quantiles of the training density (same for every arm);
* mini-GenEval (`ecdit eval`'s detector and categories) on 'eval_prompts' generated images;
* routing (MoE arms): experts per latent token on noised ground-truth renders, split into tokens
  that cover part of a shape and background tokens (the paper's Figure 6, with exact masks).

  python benchmarks/paper_claims.py run --setting default --out runs/claims     # train + eval -> results.json
  python benchmarks/paper_claims.py report --results runs/claims/results.json   # -> docs/REPRODUCTION.md + PNGs
  python benchmarks/paper_claims.py check-params                                # matched activated compute

`run` writes the results JSON after every (seed, arm) run and skips runs already in it, so an
interrupted run continues where it stopped; `report` works on whatever seeds are complete.
Settings: `test` (a few steps per arm, for the test suite), `default` (the documented run: 12 runs of
about 160 CPU-seconds each, some 16 minutes on 2 idle cores with --jobs 2), `gpu` (longer and larger,
for one GPU; documented, not run here).
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARMS = ("dense", "gs-8e", "ec-8e", "ec-16e")
LABELS = {"dense": "Dense (FFN 768)", "gs-8e": "GShard top-2, 8E", "ec-8e": "EC-DiT, 8E", "ec-16e": "EC-DiT, 16E"}
CONFIG_DIR = ROOT / "configs" / "claims"
MATCH_TOLERANCE = 0.01          # activated parameters of every arm within 1% of the dense arm's
VAL_SEED = 104729               # held-out renders of the validation loss and the routing probe,
ROUTING_SEED = 130363           # apart from the training data (seed 0) and the eval prompts (7919)
ROUTING_T = (0.25, 0.5, 0.75)   # noise levels of the routing probe (t = 0 noise, t = 1 data)


@dataclass(frozen=True)
class Setting:
    steps: int
    seeds: tuple[int, ...]
    eval_prompts: int
    eval_steps: int
    val_images: int
    routing_images: int
    log_interval: int
    batch_size: int = 32
    cfg_scale: float = 4.0


SETTINGS = {
    # the test suite: every artefact, in seconds
    "test": Setting(steps=3, seeds=(0, 1), eval_prompts=4, eval_steps=2, val_images=8, routing_images=4,
                    log_interval=1),
    # the documented CPU run: 12 runs of 0.23-0.27 CPU-s per training step (measured) plus ~32 CPU-s of
    # evaluation each, ~1900 CPU-s in all (docs/REPRODUCTION.md); kept well under 40 minutes of 2 cores
    # so that it also finishes on a shared machine
    "default": Setting(steps=500, seeds=(0, 1, 2), eval_prompts=100, eval_steps=20, val_images=256,
                       routing_images=64, log_interval=10),
    # one GPU: longer runs, larger batch, more seeds and prompts (not run for the committed report)
    "gpu": Setting(steps=20000, seeds=(0, 1, 2, 3, 4), eval_prompts=500, eval_steps=30, val_images=2048,
                   routing_images=512, log_interval=50, batch_size=256),
}


# ----------------------------------------------------------------------------- configs and compute

def arm_config(arm: str, overrides: tuple[str, ...] | list[str] = ()):
    from ecdit_dist.config import load_config

    return load_config(CONFIG_DIR / f"{arm}.yaml", list(overrides))


def arm_params() -> dict[str, dict[str, int]]:
    """`ecdit params` of every arm (built on the meta device)."""
    from ecdit_dist.params import count_params

    out = {}
    for arm in ARMS:
        cfg = arm_config(arm)
        out[arm] = count_params(cfg.model, cfg.moe)
    return out


def check_matched_compute(params: dict[str, dict[str, int]] | None = None,
                          tolerance: float = MATCH_TOLERANCE) -> dict[str, float]:
    """Activated parameters of every arm relative to the dense arm; raises if one is off by more than
    `tolerance` (the routers, d x E per MoE layer, are the only difference by design)."""
    params = params or arm_params()
    ref = params["dense"]["activated_params"]
    ratios = {arm: p["activated_params"] / ref for arm, p in params.items()}
    bad = {a: r for a, r in ratios.items() if abs(r - 1) > tolerance}
    if bad:
        raise AssertionError(f"activated parameters not matched within {tolerance:.0%} of the dense arm: "
                             + ", ".join(f"{a} x{r:.4f}" for a, r in bad.items()))
    return ratios


# ----------------------------------------------------------------------------- measurements

def _encoder_vae(cfg):
    from ecdit_dist.data.shapes import ShapesSource

    # the training data's normalisation (it depends on data.seed and the image size)
    return ShapesSource(cfg.data.num_samples, 2 * cfg.model.latent_size, cfg.data.seed).vae


def _renders(n: int, size: int, seed: int):
    from ecdit_dist.evaluation import render_prompts

    return render_prompts(n, size, seed)       # (n, 3, size, size) in [0, 1], captions


def validation_loss(bundle, n: int, batch: int = 64) -> float:
    """Velocity MSE (all tokens) of the model on n held-out renders, conditioned on their captions,
    with noise and timesteps fixed by the index (quantiles of the training timestep density)."""
    import torch

    from ecdit_dist.diffusion import interpolate, velocity_target

    cfg, model = bundle.cfg, bundle.model
    images, captions = _renders(n, 2 * cfg.model.latent_size, VAL_SEED)
    x = _encoder_vae(cfg).encode(torch.from_numpy(images) * 2 - 1)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = cfg.diffusion.t_mean + cfg.diffusion.t_std * torch.distributions.Normal(0.0, 1.0).icdf(q)
    t = torch.sigmoid(u).float()[torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(VAL_SEED))
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, batch):
            sl = slice(s, s + batch)
            emb, mask = bundle.text_encoder.encode(captions[sl])
            xt = interpolate(x[sl], noise[sl], t[sl]).to(bundle.device)
            v = model.velocity(xt, t[sl].to(bundle.device), emb.to(bundle.device), mask.to(bundle.device))
            total += (v.float().cpu() - velocity_target(x[sl], noise[sl])).pow(2).mean(dim=(1, 2, 3)).sum().item()
    return total / n


def _png_b64(images: np.ndarray) -> str:
    """A row of uint8 images (B, H, W, 3) as a base64 PNG."""
    from PIL import Image

    strip = np.concatenate(list(images), axis=1)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mini_geneval(bundle, prompts: int, steps: int, cfg_scale: float, seed: int = 0, batch: int = 64) -> dict:
    """`ecdit eval` on the bundle: the same prompts, noise keys, sampler and detector."""
    import torch

    from ecdit_dist.evaluation import EVAL_SEED, evaluate, grammar_prompts
    from ecdit_dist.sample import generate, to_uint8

    captions = [s.caption for s in grammar_prompts(prompts, EVAL_SEED)]
    chunks = []
    for start in range(0, len(captions), batch):
        emb, mask = bundle.text_encoder.encode(captions[start:start + batch])
        lat = generate(bundle.model, emb, mask, steps, cfg_scale, seed * 1_000_003 + start, bundle.autocast_dtype)
        chunks.append(bundle.decode(lat).float().cpu())
    decoded = torch.cat(chunks)
    images = ((decoded.clamp(-1, 1) + 1) / 2).numpy()
    result = evaluate(images, captions)
    result["samples_png"] = _png_b64(to_uint8(decoded[:8]))
    result["sample_captions"] = captions[:8]
    return result


def token_coverage(images: np.ndarray, tokens_per_side: int) -> np.ndarray:
    """Share of each latent token's pixels that belong to a shape: images (B, 3, H, W) renders in
    [0, 1] on the grammar's background -> (B, n, n) in [0, 1]."""
    from ecdit_dist.data.shapes import BACKGROUND

    bg = np.array(BACKGROUND, dtype=np.float32).reshape(1, 3, 1, 1)
    shape = np.abs(images - bg).max(axis=1) > 0.02                    # (B, H, W), anti-aliased edges count
    B, H, W = shape.shape
    k = H // tokens_per_side
    return shape.reshape(B, tokens_per_side, k, tokens_per_side, k).mean(axis=(2, 4))


def routing_probe(bundle, n: int, batch: int = 64, keep: int = 4) -> dict | None:
    """Experts per latent token of every MoE layer on n noised renders (conditioned on their
    captions, each image routed alone: eval_group_size = one image), against the shapes' masks."""
    import torch

    from ecdit_dist.diffusion import interpolate

    model, cfg = bundle.model, bundle.cfg
    layers = [(i, b.ffn) for i, b in enumerate(model.blocks) if b.is_moe]
    if not layers:
        return None
    side = cfg.model.latent_size // cfg.model.patch_size
    S = side * side
    images, captions = _renders(n, 2 * cfg.model.latent_size, ROUTING_SEED)
    cover = token_coverage(images, side)                                # (n, side, side)
    x = _encoder_vae(cfg).encode(torch.from_numpy(images) * 2 - 1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(ROUTING_SEED))
    captured: dict[int, list] = {}
    for i, layer in layers:
        def record(index, num_tokens, filled=None, *, i=i, orig=layer._record):
            weights = None if filled is None else filled.reshape(-1).cpu().to(torch.float64)  # token choice: real slots only
            counts = torch.bincount(index.reshape(-1).cpu(), weights=weights, minlength=num_tokens)[:num_tokens]
            captured[i].append(counts.round().long())
            orig(index, num_tokens, filled)
        layer._record = record
    out: dict = {"grid": side, "t": list(ROUTING_T), "layers": {}, "examples": {}}
    shape_tok = cover > 0
    try:
        for t_val in ROUTING_T:
            counts = {i: [] for i, _ in layers}
            for s in range(0, n, batch):
                sl = slice(s, s + batch)
                for i, _ in layers:
                    captured[i] = []
                emb, mask = bundle.text_encoder.encode(captions[sl])
                t = torch.full((x[sl].shape[0],), t_val)
                xt = interpolate(x[sl], noise[sl], t).to(bundle.device)
                with torch.no_grad():
                    model.velocity(xt, t.to(bundle.device), emb.to(bundle.device), mask.to(bundle.device))
                for i, _ in layers:
                    assert len(captured[i]) == 1 and captured[i][0].numel() == x[sl].shape[0] * S
                    counts[i].append(captured[i][0].view(-1, side, side))
            for i, _ in layers:
                c = torch.cat(counts[i]).double().numpy()              # (n, side, side)
                per_image = [(c[k][shape_tok[k]].mean(), c[k][~shape_tok[k]].mean()) for k in range(n)
                             if shape_tok[k].any() and (~shape_tok[k]).any()]
                diffs = [a - b for a, b in per_image]
                entry = out["layers"].setdefault(str(i), {})
                entry[str(t_val)] = {
                    "shape_mean": float(c[shape_tok].mean()), "background_mean": float(c[~shape_tok].mean()),
                    "all_mean": float(c.mean()), "unchosen_share": float((c == 0).mean()),
                    "per_image_diff_mean": float(np.mean(diffs)),
                    "per_image_diff_positive": float(np.mean(np.array(diffs) > 0)),
                    "coverage_corr": float(np.corrcoef(c.reshape(-1), cover.reshape(-1))[0, 1])
                    if c.std() > 0 else 0.0,
                }
                out["examples"][f"{i}/{t_val}"] = c[:keep].tolist()
    finally:
        for i, layer in layers:
            del layer._record
    out["example_images"] = _png_b64((images[:keep].transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))
    out["example_captions"] = captions[:keep]
    out["example_coverage"] = cover[:keep].tolist()
    out["shape_token_share"] = float(shape_tok.mean())
    out["num_experts"] = layers[0][1].num_experts
    return out


def initial_model_bundle(bundle, seed: int):
    """The bundle with the run's weights before training (the same seed): the control of the routing
    probe, since a router that has learned nothing already reacts to the inputs' statistics."""
    import dataclasses

    from ecdit_dist.model import ECDiT
    from ecdit_dist.parallel.init import init_from_seed

    import torch

    with torch.device("meta"):
        model = ECDiT(bundle.cfg.model, bundle.cfg.moe)
    model.to_empty(device=bundle.device)
    init_from_seed(model, seed)
    return dataclasses.replace(bundle, model=model.eval())


# ----------------------------------------------------------------------------- run

def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def train_and_measure(arm: str, seed: int, setting: Setting, run_dir: Path, log=print) -> dict:
    from ecdit_dist.inference import load_for_sampling
    from ecdit_dist.metrics import read_metrics
    from ecdit_dist.train import Trainer

    if run_dir.exists():
        shutil.rmtree(run_dir)           # a run cut short restarts from scratch: every run is whole
    overrides = [f"seed={seed}", f"train.steps={setting.steps}", f"run.dir={run_dir}",
                 f"logging.interval={setting.log_interval}", f"train.global_batch_size={setting.batch_size}"]
    if setting.batch_size != 32:
        overrides.append("train.precision=auto")
    cfg = arm_config(arm, overrides)
    c0, w0 = time.process_time(), time.perf_counter()
    Trainer(cfg).run()
    train_cpu, train_wall = time.process_time() - c0, time.perf_counter() - w0
    rows = read_metrics(run_dir)
    curve = {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]}
    if any("aux_loss" in r for r in rows):
        curve["aux_loss"] = [r.get("aux_loss") for r in rows]
    c1, w1 = time.process_time(), time.perf_counter()
    bundle = load_for_sampling(run_dir, use_ema=True, device="auto")
    val = validation_loss(bundle, setting.val_images)
    geneval = mini_geneval(bundle, setting.eval_prompts, setting.eval_steps, setting.cfg_scale)
    routing = routing_probe(bundle, setting.routing_images)
    routing_init = routing_probe(initial_model_bundle(bundle, seed), setting.routing_images) if routing else None
    eval_cpu, eval_wall = time.process_time() - c1, time.perf_counter() - w1
    log(f"{arm} seed {seed}: final loss {curve['loss'][-1]:.4f}, val loss {val:.4f}, "
        f"mini-GenEval {geneval['overall']:.3f}; train {train_cpu:.0f} CPU-s ({train_wall:.0f} s wall), "
        f"eval {eval_cpu:.0f} CPU-s ({eval_wall:.0f} s wall)")
    return {"arm": arm, "seed": seed, "curve": curve, "val_loss": val, "geneval": geneval, "routing": routing,
            "routing_init": routing_init,
            "cpu_s": {"train": train_cpu, "eval": eval_cpu}, "wall_s": {"train": train_wall, "eval": eval_wall},
            "cpu_s_per_step": train_cpu / setting.steps}


def _worker(task: tuple[str, int, str, str]) -> tuple[str, dict]:
    """One (arm, seed) run in a worker process (1 torch thread)."""
    import torch

    arm, seed, setting, out = task
    torch.set_num_threads(1)
    return f"{arm}/seed{seed}", train_and_measure(arm, seed, SETTINGS[setting], Path(out) / arm / f"seed{seed}")


def argv_is_ours() -> bool:
    return bool(sys.argv) and Path(sys.argv[0]).name == "paper_claims.py"


def cmd_run(args: argparse.Namespace) -> int:
    import multiprocessing

    from benchmarks.common import machine_info

    setting = SETTINGS[args.setting]
    seeds = tuple(args.seeds) if args.seeds else setting.seeds
    arms = tuple(args.arms) if args.arms else ARMS
    out = Path(args.out)
    path = Path(args.results) if args.results else out / "results.json"
    params = arm_params()
    ratios = check_matched_compute(params)
    results: dict = {}
    if path.exists():
        results = json.loads(path.read_text())
        if results.get("setting") != args.setting or results.get("settings") != json.loads(json.dumps(asdict(setting))):
            print(f"error: {path} holds results of another setting; give another --out or --results",
                  file=sys.stderr)
            return 2
    results.update({"setting": args.setting, "settings": asdict(setting), "arms": list(ARMS),
                    "params": params, "activated_ratio": ratios, "machine": machine_info(), "jobs": args.jobs,
                    "command": "python benchmarks/paper_claims.py " + " ".join(sys.argv[1:] if argv_is_ours() else [])})
    results.setdefault("runs", {})
    # seed-major: runs finish roughly in this order, so stopping early leaves the arms balanced
    tasks = [(arm, seed, args.setting, str(out)) for seed, arm in itertools.product(seeds, arms)
             if f"{arm}/seed{seed}" not in results["runs"]]

    def done(key: str, run: dict) -> None:
        results["runs"][key] = run
        results["updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        _write_json(path, results)
        if not args.keep_checkpoints:
            shutil.rmtree(out / run["arm"] / f"seed{run['seed']}" / "checkpoints", ignore_errors=True)

    if args.jobs == 1:
        for task in tasks:
            done(*_worker(task))
    elif tasks:
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(tasks)), maxtasksperchild=1) as pool:
            for key, run in pool.imap_unordered(_worker, tasks):
                done(key, run)
    _write_json(path, results)
    print(f"wrote {path}")
    return 0


def cmd_check_params(args: argparse.Namespace) -> int:
    params = arm_params()
    ratios = check_matched_compute(params)
    print(f"{'arm':<8}{'total':>12}{'activated':>12}{'vs dense':>10}")
    for arm in ARMS:
        p = params[arm]
        print(f"{arm:<8}{p['total_params']:>12,}{p['activated_params']:>12,}{ratios[arm]:>10.4f}")
    print(f"activated parameters matched within {MATCH_TOLERANCE:.0%}")
    return 0


# ----------------------------------------------------------------------------- statistics

def mean_sd(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def permutation_p(better: list[float], worse: list[float]) -> float:
    """One-sided exact permutation test that `better` has the larger mean: the share of all
    relabelings of the pooled values whose difference of means is at least the observed one."""
    pooled = better + worse
    k = len(better)
    observed = statistics.fmean(better) - statistics.fmean(worse)
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), k):
        a = [pooled[i] for i in idx]
        b = [pooled[i] for i in range(len(pooled)) if i not in idx]
        total += 1
        hits += statistics.fmean(a) - statistics.fmean(b) >= observed - 1e-12
    return hits / total


# ----------------------------------------------------------------------------- report

def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def draw_loss_curves(results: dict, path: Path, window: int = 5, from_share: float = 0.1) -> Path:
    """Training loss against step: the mean over seeds (moving average of `window` logged points)
    per arm, each seed as a thin line; logged steps from `from_share` of the run on."""
    from PIL import Image, ImageDraw

    from ecdit_dist.profiling.plot import SERIES_COLOURS, save_png

    W, H, L, R, T, B = 760, 420, 70, 190, 30, 50
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    series = {}
    for arm in results["arms"]:
        runs = [r for r in results["runs"].values() if r["arm"] == arm]
        if not runs:
            continue
        steps = runs[0]["curve"]["step"]
        per_seed = [_smooth(r["curve"]["loss"], window) for r in runs]
        mean = [statistics.fmean(v) for v in zip(*per_seed)]
        series[arm] = (steps, per_seed, mean)
    if not series:
        raise ValueError("no complete run in the results")
    xmax = max(s[0][-1] for s in series.values())
    skip = max(1, int(len(next(iter(series.values()))[0]) * from_share))   # leave out the warm-up
    xmin = next(iter(series.values()))[0][skip] if skip < len(next(iter(series.values()))[0]) else 0
    ys = [v for _, per_seed, _ in series.values() for curve in per_seed for v in curve[skip:]]
    ylo, yhi = min(ys), max(ys)
    pad = 0.05 * (yhi - ylo or 1)
    ylo, yhi = ylo - pad, yhi + pad

    def px(step: float, loss: float) -> tuple[float, float]:
        return (L + (W - L - R) * (step - xmin) / max(xmax - xmin, 1),
                T + (H - T - B) * (1 - (loss - ylo) / (yhi - ylo)))

    d.rectangle([L, T, W - R, H - B], outline=(0, 0, 0))
    for k in range(6):
        y = ylo + (yhi - ylo) * k / 5
        _, yy = px(0, y)
        d.line([L - 4, yy, L, yy], fill=(0, 0, 0))
        d.text((4, yy - 6), f"{y:.4f}", fill=(0, 0, 0))
        s = xmin + (xmax - xmin) * k / 5
        xx, _ = px(s, ylo)
        d.line([xx, H - B, xx, H - B + 4], fill=(0, 0, 0))
        d.text((xx - 10, H - B + 8), f"{s:.0f}", fill=(0, 0, 0))
    d.text((L + (W - L - R) // 2 - 20, H - 22), "step", fill=(0, 0, 0))
    d.text((L, 8), f"training loss (moving average of {window} logged steps; thick: mean over seeds)",
           fill=(0, 0, 0))
    for n, (arm, (steps, per_seed, mean)) in enumerate(series.items()):
        col = SERIES_COLOURS[n % len(SERIES_COLOURS)]
        light = tuple(int(c + 0.6 * (255 - c)) for c in col)
        for curve in per_seed:
            pts = [px(s, min(max(v, ylo), yhi)) for s, v in zip(steps[skip:], curve[skip:])]
            d.line(pts, fill=light, width=1)
        pts = [px(s, min(max(v, ylo), yhi)) for s, v in zip(steps[skip:], mean[skip:])]
        d.line(pts, fill=col, width=3)
        d.line([W - R + 12, T + 14 + 20 * n, W - R + 36, T + 14 + 20 * n], fill=col, width=3)
        d.text((W - R + 42, T + 8 + 20 * n), f"{LABELS.get(arm, arm)} ({len(per_seed)})", fill=(0, 0, 0))
    return save_png(img, path)


def _decode_png(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def _first_run(results: dict, arm: str) -> dict | None:
    runs = [r for r in results["runs"].values() if r["arm"] == arm]
    return min(runs, key=lambda r: r["seed"]) if runs else None


def draw_samples(results: dict, path: Path) -> Path | None:
    """The first 8 evaluation images of every arm (its lowest finished seed), one row per arm."""
    from PIL import Image, ImageDraw

    from ecdit_dist.profiling.plot import save_png

    rows = [(arm, _first_run(results, arm)) for arm in results["arms"]]
    rows = [(a, r) for a, r in rows if r]
    if not rows:
        return None
    strips = [(f"{LABELS.get(a, a)}, seed {r['seed']}", _decode_png(r["geneval"]["samples_png"])) for a, r in rows]
    scale, label_w = 3, 150
    w = label_w + max(s.width for _, s in strips) * scale
    h = sum(s.height * scale + 6 for _, s in strips) + 6
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    y = 6
    for label, strip in strips:
        img.paste(strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST), (label_w, y))
        d.text((4, y + strip.height * scale // 2 - 6), label, fill=(0, 0, 0))
        y += strip.height * scale + 6
    return save_png(img, path)


def draw_routing(run: dict, path: Path, t_val: float = 0.5) -> Path:
    """Example renders, their shape coverage per latent token and experts per token of every MoE
    layer at noise level t (the paper's Figure 6 on renders with known masks)."""
    from PIL import Image, ImageDraw

    from ecdit_dist.profiling.plot import colour, save_png

    rt = run["routing"]
    strip = _decode_png(rt["example_images"])
    n_img = len(rt["example_captions"])
    side = rt["grid"]
    cell = 12
    panel = side * cell
    layers = sorted(rt["layers"], key=int)
    cols = 2 + len(layers)
    label_h = 34
    W = 10 + cols * (panel + 10)
    H = label_h + n_img * (panel + 10) + 40
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    size = strip.height
    # colour scale: 0 to the most experts any token got in these panels (at most E), not E itself,
    # so the contrast around the mean of 2 stays visible with many experts
    E = max(1, math.ceil(max(v for i in layers for img_ in rt["examples"][f"{i}/{t_val}"] for row in img_
                             for v in row)))
    titles = ["render", "shape coverage"] + [f"layer {i}: experts" for i in layers]
    for c, title in enumerate(titles):
        d.text((10 + c * (panel + 10), 4), title, fill=(0, 0, 0))
    d.text((10, 18), f"t = {t_val} (0 noise, 1 data)", fill=(0, 0, 0))
    for k in range(n_img):
        y = label_h + k * (panel + 10)
        im = strip.crop((k * size, 0, (k + 1) * size, size)).resize((panel, panel), Image.NEAREST)
        img.paste(im, (10, y))
        grids = [rt["example_coverage"][k]] + [rt["examples"][f"{i}/{t_val}"][k] for i in layers]
        for c, grid in enumerate(grids):
            x0 = 10 + (c + 1) * (panel + 10)
            vmax = 1.0 if c == 0 else E
            for r, row in enumerate(grid):
                for q, v in enumerate(row):
                    d.rectangle([x0 + q * cell, y + r * cell, x0 + (q + 1) * cell - 1, y + (r + 1) * cell - 1],
                                fill=colour(v, vmax))
    y = H - 30
    for k in range(101):
        d.line([10 + 2 * k, y, 10 + 2 * k, y + 8], fill=colour(E * k / 100, E), width=2)
    d.text((10, y + 12), "0", fill=(0, 0, 0))
    d.text((200, y + 12), str(E), fill=(0, 0, 0))
    d.text((230, y), "experts per token (coverage: 0 to 1)", fill=(0, 0, 0))
    return save_png(img, path)


def steps_to_reach(results: dict, reference: str, window: int = 5) -> dict[str, int | None]:
    """Per arm, the first logged step at which the seed-mean smoothed training loss is at or below
    the reference arm's final smoothed value."""
    mean = {}
    for arm in results["arms"]:
        runs = [r for r in results["runs"].values() if r["arm"] == arm]
        if runs:
            curves = [_smooth(r["curve"]["loss"], window) for r in runs]
            mean[arm] = (runs[0]["curve"]["step"], [statistics.fmean(v) for v in zip(*curves)])
    if reference not in mean:
        return {}
    target = mean[reference][1][-1]
    return {arm: next((st for st, v in zip(steps, vals) if v <= target), None) for arm, (steps, vals) in mean.items()}


def _fmt(m: float, s: float, digits: int = 3) -> str:
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarise(results: dict) -> dict:
    """Per arm: seeds, final training loss (mean of the last tenth of the logged losses),
    validation loss, mini-GenEval scores; each as a list over seeds."""
    from ecdit_dist.evaluation import CATEGORIES

    out = {}
    for arm in results["arms"]:
        runs = sorted((r for r in results["runs"].values() if r["arm"] == arm), key=lambda r: r["seed"])
        if not runs:
            continue
        tail = max(1, len(runs[0]["curve"]["loss"]) // 10)
        out[arm] = {
            "seeds": [r["seed"] for r in runs],
            "final_loss": [statistics.fmean(r["curve"]["loss"][-tail:]) for r in runs],
            "val_loss": [r["val_loss"] for r in runs],
            "overall": [r["geneval"]["overall"] for r in runs],
            "full_prompt": [r["geneval"]["full_prompt"] for r in runs],
            "categories": {c: [r["geneval"]["categories"][c] for r in runs] for c in CATEGORIES},
            "cpu_s": [r["cpu_s"]["train"] + r["cpu_s"]["eval"] for r in runs],
            "cpu_s_per_step": [r["cpu_s_per_step"] for r in runs],
        }
    return out


CLAIMS = [
    # (name, paper source, better arm, worse arm)
    ("Expert choice trains to a lower loss than dense at matched activated compute", "Fig. 8", "ec-8e", "dense"),
    ("Expert choice beats token-choice top-2 (GShard) with the same experts", "Fig. 5, Table 4", "ec-8e", "gs-8e"),
    ("More experts help (16 against 8)", "Fig. 8, Sec. 3.6", "ec-16e", "ec-8e"),
    ("Expert choice with more experts (16) beats token choice (8)", "Sec. 3.5", "ec-16e", "gs-8e"),
]


def compare(summary: dict, better: str, worse: str) -> dict | None:
    if better not in summary or worse not in summary:
        return None
    out = {}
    for metric, sign in (("val_loss", -1), ("final_loss", -1), ("overall", 1)):
        a, b = summary[better][metric], summary[worse][metric]
        if sign < 0:       # lower is better: test the negated values
            p = permutation_p([-v for v in a], [-v for v in b]) if len(a) + len(b) > 2 else None
        else:
            p = permutation_p(a, b) if len(a) + len(b) > 2 else None
        if len(a) + len(b) > 2:   # the opposite direction, to tell a reversal from noise
            p_rev = permutation_p(b, a) if sign > 0 else permutation_p([-v for v in b], [-v for v in a])
        else:
            p_rev = None
        diff = statistics.fmean(a) - statistics.fmean(b)
        spreads = [statistics.variance(x) for x in (a, b) if len(x) > 1]
        pooled = math.sqrt(statistics.fmean(spreads)) if spreads else None
        out[metric] = {"diff": diff, "p": p, "p_reverse": p_rev, "direction": sign * diff > 0, "pooled_sd": pooled}
    return out


def _verdict(c: dict) -> str:
    if not c["direction"]:
        return "not held"
    if c["p"] is not None and c["p"] <= 0.05:
        return "held"
    return "direction only"


def build_report(results: dict, img_dir: Path, doc_path: Path) -> str:
    from ecdit_dist.evaluation import CATEGORIES, chance_levels

    summary = summarise(results)
    s = results["settings"]
    rel = lambda p: Path(p).resolve().relative_to(doc_path.resolve().parent).as_posix() \
        if Path(p).resolve().is_relative_to(doc_path.resolve().parent) else str(p)
    loss_png = draw_loss_curves(results, img_dir / "loss.png")
    late_png = draw_loss_curves(results, img_dir / "loss-second-half.png", from_share=0.5)
    samples_png = draw_samples(results, img_dir / "samples.png")
    routing_pngs = {}
    for arm in results["arms"]:
        run = _first_run(results, arm)
        if run and run["routing"] and arm.startswith("ec"):
            routing_pngs[arm] = (draw_routing(run, img_dir / f"routing-{arm}.png"), run["seed"])
    complete = {a: len(v["seeds"]) for a, v in summary.items()}
    planned = len(s["seeds"])
    m = results["machine"]
    L: list[str] = []
    L.append("# Reproducing the paper's claims at small scale")
    L.append("")
    L.append("Expert choice (EC-DiT) against a dense model and token-choice top-2 (GShard) at matched "
             "activated compute, on the embedded shapes data, scored by training and validation loss and by "
             "the mini-GenEval of [EVAL.md](EVAL.md). Generated by `benchmarks/paper_claims.py`; every number "
             "below comes from its results JSON.")
    L.append("")
    L.append("```bash")
    L.append(f"python benchmarks/paper_claims.py run --setting {results['setting']} --out runs/claims")
    L.append("python benchmarks/paper_claims.py report --results runs/claims/results.json")
    L.append("```")
    commands = [c for c in results.get("commands", []) if c]
    if len(commands) > 1:
        L.append("")
        L.append("The numbers below came from the same setting split over runs side by side, then merged "
                 "(a run of the same arm and seed is the same run, taken once):")
        L.append("")
        L.append("```bash")
        L.extend(re.sub(r"--out \S*/runs/", "--out runs/", c) for c in commands)
        L.append("python benchmarks/paper_claims.py report --results "
                 + " ".join(f"runs/{Path(p).parent.name}/results.json" for p in results["parts"]))
        L.append("```")
    L.append("")
    if any(n < planned for n in complete.values()) or len(complete) < len(results["arms"]):
        L.append(f"**Incomplete:** the setting plans {planned} seeds per arm; this report holds "
                 + ", ".join(f"{LABELS[a]}: {complete.get(a, 0)}" for a in results["arms"])
                 + ". The runs that did not finish in time are missing, not estimated.")
        L.append("")
    L.append("## Setup")
    L.append("")
    L.append("| arm | config | total params | activated params | vs dense |")
    L.append("|---|---|---|---|---|")
    for arm in results["arms"]:
        p = results["params"][arm]
        L.append(f"| {LABELS[arm]} | `configs/claims/{arm}.yaml` | {p['total_params']:,} | "
                 f"{p['activated_params']:,} | {results['activated_ratio'][arm]:.4f} |")
    L.append("")
    L.append("The tiny preset (d = 128, 4 blocks, 64 latent tokens of 16x16x8 latents, 50% token masking in "
             "training). Blocks 1 and 3 are MoE in the MoE arms; the dense arm widens every FFN to 768 so that "
             "its activated parameters match (2 dense blocks x 512 + 2 MoE blocks x 2 experts x 512 = "
             "4 x 768). Token choice uses top-2 with capacity factor 1.25 and the GShard load-balancing loss "
             "(weight 0.01); expert choice uses capacity factor 2 over groups of 32 tokens in training and one "
             "image (64 tokens) when sampling. The remaining difference in activated parameters is the routers "
             f"(d x E per MoE layer); `check-params` asserts it is under {MATCH_TOLERANCE:.0%}.")
    L.append("")
    L.append(f"Every arm: {s['steps']} steps of batch {s['batch_size']}, AdamW at 1e-3 with 100 warm-up steps, "
             f"EMA 0.995, seeds {', '.join(map(str, s['seeds']))}: a seed sets the initial weights, the order of the "
             "(one) dataset, the noise, timesteps and token masks, the same for every arm, so the arms of one "
             "seed see the same batches. Measured on the EMA weights: the validation loss "
             f"(velocity MSE over all tokens of {s['val_images']} held-out renders, fixed noise, timesteps at "
             f"the quantiles of the training density); the mini-GenEval on {s['eval_prompts']} prompts "
             f"({s['eval_steps']} Euler steps, guidance {s['cfg_scale']}); the routing of "
             f"{s['routing_images']} noised held-out renders.")
    L.append("")
    cpu = [r["cpu_s"]["train"] + r["cpu_s"]["eval"] for r in results["runs"].values()]
    per_step = {a: statistics.fmean(v["cpu_s_per_step"]) for a, v in summary.items()}
    wall = [r["wall_s"]["train"] + r["wall_s"]["eval"] for r in results["runs"].values()]
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (1 thread per run). "
             f"The {len(cpu)} runs took {sum(cpu):.0f} CPU-seconds (user + system) in all, "
             f"{sum(cpu) / 2 / 60:.0f} minutes on 2 idle cores; training "
             + ", ".join(f"{LABELS[a]} {v:.2f}" for a, v in per_step.items())
             + f" CPU-s per step (with start-up). Measured as CPU time, not wall time: the machine was shared "
             f"(load average {m['loadavg_1m']} at the start), and the runs' wall times add up to "
             f"{sum(wall) / 3600:.1f} hours (several ran at once). Results updated " + results.get("updated", "?")
             + (f", from {len(results['parts'])} invocations of `run` side by side (seeds split between them)"
                if results.get("parts") else "") + ".")
    L.append("")
    L.append("## Loss")
    L.append("")
    L.append(f"![training loss]({rel(loss_png)})")
    L.append("")
    L.append(f"![training loss, second half]({rel(late_png)})")
    L.append("")
    L.append("Mean ± standard deviation over seeds. Final training loss: mean of the last tenth of the logged "
             "losses (masked tokens, as trained).")
    L.append("")
    L.append("| arm | seeds | final training loss | validation loss |")
    L.append("|---|---|---|---|")
    for arm, v in summary.items():
        L.append(f"| {LABELS[arm]} | {', '.join(map(str, v['seeds']))} | {_fmt(*mean_sd(v['final_loss']), 4)} | "
                 f"{_fmt(*mean_sd(v['val_loss']), 4)} |")
    L.append("")
    reach = steps_to_reach(results, "dense")
    if reach:
        L.append("Steps each arm's training loss (seed mean, moving average of 5 logged steps) takes to first reach "
                 "the dense arm's final value (paper Fig. 8: EC-DiT-XXL at 200K steps matches DENSE-XXL at 400K): "
                 + ", ".join(f"{LABELS[a]} {'never' if v is None else v}" for a, v in reach.items())
                 + ". Read with the training loss's noise in mind (the second chart): differences of a few logged "
                 "steps mean nothing.")
        L.append("")
    L.append("## mini-GenEval")
    L.append("")
    chance = chance_levels()
    short = {"single_object": "single", "two_objects": "two", "counting": "counting", "colours": "colours",
             "position": "position", "colour_attribution": "attribution"}
    L.append("| arm | " + " | ".join(short[c] for c in CATEGORIES) + " | overall | full prompt |")
    L.append("|---|" + "---|" * (len(CATEGORIES) + 2))
    for arm, v in summary.items():
        cells = []
        for c in CATEGORIES:
            vals = [x for x in v["categories"][c] if x is not None]
            cells.append(_fmt(*mean_sd(vals), 2) if vals else "-")
        L.append(f"| {LABELS[arm]} | " + " | ".join(cells) + f" | {_fmt(*mean_sd(v['overall']), 3)} | "
                 f"{_fmt(*mean_sd(v['full_prompt']), 3)} |")
    L.append("| chance | " + " | ".join(f"{chance['categories'][c]:.2f}" for c in CATEGORIES)
             + f" | {chance['overall']:.3f} | {chance['full_prompt']:.3f} |")
    L.append("")
    L.append(f"Mean ± standard deviation over seeds, {s['eval_prompts']} prompts per run: one prompt is "
             f"{1 / s['eval_prompts']:.3f} of a score, so single categories move by a few hundredths between "
             "seeds from prompt sampling alone.")
    if samples_png:
        L.append("")
        L.append(f"![samples]({rel(samples_png)})")
        L.append("")
        captions = next(iter(results["runs"].values()))["geneval"]["sample_captions"]
        L.append("The first evaluation prompts (each arm's lowest finished seed): "
                 + "; ".join(f"'{c}'" for c in captions) + ".")
    L.append("")
    share = [r["routing"]["shape_token_share"] for r in results["runs"].values() if r["routing"]]
    share_text = f"{statistics.fmean(share):.0%}" if share else "-"
    L.append("## Routing: experts per token on shapes and on background")
    L.append("")
    L.append("Tokens are split by the render they were made from: a shape token covers at least one pixel of a "
             f"shape (anti-aliased edges included; {share_text} of the tokens), a background token none. "
             "Mean experts per token at each noise level t (0 = pure noise, 1 = the image), mean ± standard "
             "deviation over seeds; 'seeds' counts the seeds where shape tokens got more experts. Expert "
             "choice averages exactly 2 per token over an image (the capacity factor); token choice gives "
             "every token at most 2 (fewer when an expert's buffer overflows).")
    L.append("")
    L.append("| arm | layer | t | shape tokens | background | difference | seeds | difference before training "
             "| corr(coverage, experts) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    routing_rows = {}
    for arm in results["arms"]:
        runs = [r for r in results["runs"].values() if r["arm"] == arm and r["routing"]]
        if not runs:
            continue
        for layer in sorted(runs[0]["routing"]["layers"], key=int):
            for t in runs[0]["routing"]["t"]:
                st = [r["routing"]["layers"][layer][str(t)] for r in runs]
                st0 = [r["routing_init"]["layers"][layer][str(t)] for r in runs if r.get("routing_init")]
                sh = [x["shape_mean"] for x in st]
                bg = [x["background_mean"] for x in st]
                df = [a - b for a, b in zip(sh, bg)]
                df0 = [x["shape_mean"] - x["background_mean"] for x in st0]
                co = [x["coverage_corr"] for x in st]
                routing_rows[(arm, layer, t)] = (df, df0)
                L.append(f"| {LABELS[arm]} | {layer} | {t} | {_fmt(*mean_sd(sh), 2)} | {_fmt(*mean_sd(bg), 2)} | "
                         f"{_fmt(*mean_sd(df), 2)} | {sum(d > 0 for d in df)}/{len(df)} | "
                         f"{_fmt(*mean_sd(df0), 2) if df0 else '-'} | {_fmt(*mean_sd(co), 2)} |")
    L.append("")
    L.append("'Difference before training' is the same probe on the same seed's initial weights: a router that has "
             "learned nothing already scores tokens by their input statistics (shape tokens differ from the flat "
             "background), so only the change from it is learned allocation.")
    for arm, (png, seed) in routing_pngs.items():
        L.append("")
        L.append(f"![routing {arm}]({rel(png)})")
        L.append("")
        L.append(f"{LABELS[arm]}, seed {seed}, t = 0.5: held-out renders, the share of each latent token "
                 "covered by a shape, and experts per token in each MoE layer.")
    L.append("")
    L.append("## Which claims held")
    L.append("")
    L.append("Tests: one-sided exact permutation test over seeds (all relabelings of the pooled per-seed values). "
             "With n and m seeds the smallest possible p is 1 / C(n + m, n), reached only when every seed of one "
             "arm beats every seed of the other: 0.05 for 3 seeds against 3, 0.10 for 3 against 2, 0.17 for 2 "
             "against 2, so fewer than 3 seeds a side can never reach 'held'. 'held': the paper's direction with "
             "p <= 0.05; 'direction only': the paper's direction, not significant; 'not held': the opposite "
             "direction (significant or not).")
    L.append("")
    L.append("| claim | paper | validation loss (diff, p) | training loss (diff, p) | mini-GenEval (diff, p) |")
    L.append("|---|---|---|---|---|")
    verdicts = {}
    for name, src, better, worse in CLAIMS:
        c = compare(summary, better, worse)
        if c is None:
            L.append(f"| {name} | {src} | not run | not run | not run |")
            continue
        verdicts[name] = c
        cells = []
        for metric, digits in (("val_loss", 4), ("final_loss", 4), ("overall", 3)):
            x = c[metric]
            p = "-" if x["p"] is None else f"{x['p']:.2f}"
            cells.append(f"{_verdict(x)}: {x['diff']:+.{digits}f}, p = {p}")
        L.append(f"| {name} ({LABELS[better]} vs {LABELS[worse]}) | {src} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Routing (paper Fig. 6, more experts on detailed tokens than on background): "
             + routing_statement(routing_rows))
    L.append("")
    L.append("### In plain words")
    L.append("")
    L.extend(plain_words(summary, verdicts, routing_rows, results))
    L.append("")
    L.append("## The README's main job")
    L.append("")
    L.extend(main_job_note(summary, results))
    L.append("")
    L.append("## Settings")
    L.append("")
    L.append("| setting | steps | batch | seeds | eval prompts | Euler steps | val images | routing images |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name, st in SETTINGS.items():
        L.append(f"| `{name}` | {st.steps} | {st.batch_size} | {len(st.seeds)} | {st.eval_prompts} | "
                 f"{st.eval_steps} | {st.val_images} | {st.routing_images} |")
    L.append("")
    L.append("`test` is what the test suite runs (every artefact, seconds); `default` made this report; `gpu` is "
             f"for one GPU (bf16 autocast, batch 256, 20 000 steps, 5 seeds), where differences that {s['steps']} "
             "CPU steps cannot resolve should separate: `python benchmarks/paper_claims.py run --setting gpu "
             "--out runs/claims-gpu --jobs 1`.")
    L.append("")
    return "\n".join(L)


def routing_statement(rows: dict) -> str:
    ec = {k: v for k, v in rows.items() if k[0].startswith("ec")}
    if not ec:
        return "no expert-choice run finished."
    trained = [d for df, _ in ec.values() for d in df]
    init = [d for _, df0 in ec.values() for d in df0]
    pos = sum(d > 0 for d in trained)
    text = (f"over the expert-choice runs, layers and noise levels, shape tokens got more experts than background "
            f"tokens in {pos} of {len(trained)} (run, layer, t) cases, by {statistics.fmean(trained):+.2f} experts "
            "per token on average")
    if init:
        grew = sum(a > b for df, df0 in ec.values() for a, b in zip(df, df0))
        text += (f"; the same probe on the initial weights gives {statistics.fmean(init):+.2f}, and training "
                 f"widened the gap in {grew} of {len(init)} cases")
        if statistics.fmean(init) >= statistics.fmean(trained):
            text += (". The untrained routers already prefer shape tokens at least as much, so at this scale the "
                     "preference comes from the inputs' statistics, not from training: the direction of the "
                     "paper's Figure 6 is there, learned allocation is not shown")
    return text + "."


def plain_words(summary: dict, verdicts: dict, routing_rows: dict, results: dict) -> list[str]:
    def spread(x: dict, digits: int) -> str:
        sd = "no spread (one seed a side)" if x["pooled_sd"] is None else f"seed spread {x['pooled_sd']:.{digits}f}"
        p = "no test" if x["p"] is None else f"p = {x['p']:.2f}"
        if not x["direction"] and x.get("p_reverse") is not None:
            p += f"; the opposite direction has p = {x['p_reverse']:.2f}"
        return f"{x['diff']:+.{digits}f}, {sd}, {p}"

    out = []
    for name, c in verdicts.items():
        out.append(f"* {name}: validation loss {_verdict(c['val_loss'])} ({spread(c['val_loss'], 4)}); "
                   f"mini-GenEval {_verdict(c['overall'])} ({spread(c['overall'], 3)}).")
    best_loss = min(summary, key=lambda a: statistics.fmean(summary[a]["val_loss"]))
    best_eval = max(summary, key=lambda a: statistics.fmean(summary[a]["overall"]))
    if best_loss != best_eval:
        out.append(f"* Loss and alignment disagree: {LABELS[best_loss]} has the lowest validation loss but "
                   f"{LABELS[best_eval]} the best mini-GenEval; a better denoiser on average did not give better "
                   f"prompt following after {results['settings']['steps']} steps.")
    out.append("* Confidence: p = 0.05 is the smallest value three seeds against three allow (every seed of one arm "
               "beat every seed of the other); with 4 claims x 3 measures tested, one such result could come by "
               "chance, a consistent pattern across claims less so.")
    out.append("* Routing: " + routing_statement(routing_rows))
    sds = [statistics.stdev(v["val_loss"]) for v in summary.values() if len(v["val_loss"]) > 1]
    diffs = [abs(c["val_loss"]["diff"]) for c in verdicts.values()]
    precision = (f" (seed standard deviation {statistics.median(sds):.4f} per arm, median over arms, against "
                 f"differences between arms of {min(diffs):.4f} to {max(diffs):.4f})") if sds and diffs else ""
    out.append("* The validation loss is the most precise measure here: fixed images, noise and timesteps"
               f"{precision}. The training loss of batch 32 at random timesteps moves more from step to step "
               f"than the arms differ, and the mini-GenEval of {results['settings']['eval_prompts']} prompts per "
               "run moves by a few hundredths between seeds.")
    out.append(f"* Scale: {results['settings']['steps']} steps of a model with 1.5M activated parameters is far from "
               "the paper's 800K steps on billions; 'direction only' means these data do not decide, not that "
               "the claim is false, and a claim that held here need not hold at the paper's scale (nor the "
               "reverse).")
    return out


def merge_results(paths: list[str]) -> dict:
    """One results dict from several `run` outputs of the same setting (e.g. seeds run side by side);
    runs are keyed by arm and seed."""
    merged: dict = {}
    for p in paths:
        part = json.loads(Path(p).read_text())
        if not merged:
            merged = part
            merged["commands"] = [part.get("command")]
            continue
        merged["commands"].append(part.get("command"))
        if (part["setting"], part["settings"]) != (merged["setting"], merged["settings"]):
            raise ValueError(f"{p} holds results of setting '{part['setting']}', not '{merged['setting']}'")
        # a run present twice (same arm and seed, so the same run) is taken from the first file
        merged["runs"].update({k: v for k, v in part["runs"].items() if k not in merged["runs"]})
        merged.setdefault("parts", [paths[0]]).append(p)
        merged["updated"] = max(merged.get("updated", ""), part.get("updated", ""))
    return merged


def main_job_note(summary: dict, results: dict) -> list[str]:
    """Whether this benchmark found a recipe that would make the README's main job show shapes."""
    from ecdit_dist.evaluation import chance_levels

    single = {a: statistics.fmean(x for x in v["categories"]["single_object"] if x is not None)
              for a, v in summary.items() if any(x is not None for x in v["categories"]["single_object"])}
    if not single:
        return ["No run finished; nothing to say about the main job."]
    best = max(single, key=single.get)
    chance = chance_levels()["categories"]["single_object"]
    return [
        "The main job (`configs/tiny-cpu.yaml`: expert choice with 4 experts, 2000 steps, about 10 minutes on 2 "
        "idle cores) is left as it is. The arms here train with the main job's own recipe (AdamW at 1e-3, "
        "batch 32, 100 warm-up steps, the same timestep density, masking and EMA) and differ from it only in "
        "the FFN / expert layout at a fixed activated size, which is the paper's question; none of them is a "
        "new recipe to carry over, and a better one would have to be searched for and checked at the main "
        "job's own 2000 steps, which this benchmark does not run. How far shapes come through already: in "
        "one-object prompts the detector finds an object of the named shape in "
        + ", ".join(f"{v:.2f} ({LABELS[a]})" for a, v in single.items())
        + f" of the images after {results['settings']['steps']} steps, against {chance:.2f} by chance; the "
        f"best arm is {LABELS[best]}. Counting and colour attribution, which need every object drawn as its "
        "own clean shape, stay far lower (table above)."]


def cmd_report(args: argparse.Namespace) -> int:
    try:
        results = merge_results(args.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results.get("runs"):
        print(f"error: {', '.join(args.results)} hold no finished run", file=sys.stderr)
        return 2
    doc = Path(args.doc)
    text = build_report(results, Path(args.img_dir), doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text)
    tmp.replace(doc)
    print(f"wrote {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and measure every arm and seed into a results JSON")
    r.add_argument("--setting", choices=list(SETTINGS), default="default")
    r.add_argument("--out", default="runs/claims", help="folder of the runs (and of results.json)")
    r.add_argument("--results", help="results JSON (default: OUT/results.json)")
    r.add_argument("--arms", nargs="+", choices=ARMS, help="only these arms (default: all)")
    r.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: the setting's)")
    r.add_argument("--jobs", type=int, default=2, help="runs at a time, one process and one torch thread "
                   "each (default 2: the two cores the default setting is sized for)")
    r.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint")
    r.set_defaults(func=cmd_run)
    q = sub.add_parser("report", help="results JSON -> markdown report and PNGs")
    q.add_argument("--results", nargs="+", default=["runs/claims/results.json"],
                   help="results JSON of `run` (several: merged, e.g. seeds run side by side)")
    q.add_argument("--doc", default=str(ROOT / "docs" / "REPRODUCTION.md"))
    q.add_argument("--img-dir", default=str(ROOT / "docs" / "img" / "reproduction"))
    q.set_defaults(func=cmd_report)
    c = sub.add_parser("check-params", help="assert matched activated parameters of the arms")
    c.set_defaults(func=cmd_check_params)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
