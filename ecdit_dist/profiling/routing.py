"""`ecdit profile routing`: how many experts take each latent token while an image is sampled.

Expert choice lets an expert take any token of its group, so a token may be processed by
several experts or by none. For every MoE layer and every bucket of denoising steps this
records experts per latent token of the sampled image and draws it as a heatmap over the
latent grid, next to the decoded image (the paper's Figure 6). The summary JSON holds, per
layer and bucket, the mean and maximum experts per token and the share of tokens that no
expert took, for the image and (`layer_stats`) for every token the layer routed in that
call (with guidance, the null-text copy too), as the layer itself records them.

Averaged over a routing group the mean is exactly E * C / group_size, the capacity factor
when group_size * f_c / E is whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ecdit_dist.profiling.training import experts_per_token


def bucket_of(step: int, steps: int, buckets: int) -> int:
    return step * buckets // steps


def profile_routing(model, text_encoder, decode, prompt: str, steps: int, buckets: int, cfg_scale: float,
                    seed: int) -> dict:
    """Sample one image of `prompt` and collect the routing of every expert-choice MoE layer."""
    from ecdit_dist.config import ConfigError
    from ecdit_dist.model.moe import ExpertChoiceMoE
    from ecdit_dist.sample import generate, to_uint8

    layers = [(i, b.ffn) for i, b in enumerate(model.blocks) if isinstance(b.ffn, ExpertChoiceMoE)]
    if not layers:
        raise ConfigError("the model has no expert-choice MoE layer (moe.router=expert_choice, moe.num_experts > 0)")
    if not 1 <= buckets <= steps:
        raise ConfigError(f"--buckets must be between 1 and --steps ({steps}), got {buckets}")
    S = model.config.tokens_per_image
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i, _ in layers}
    originals = {}
    for i, layer in layers:
        originals[i] = layer.route

        def observed(groups, capacity, route=layer.route, layer=layer, i=i):
            gate, rows = route(groups, capacity)
            counts = experts_per_token(rows, groups.shape[0] * groups.shape[1])
            calls[i].append((counts[:S].cpu(), layer.stats.detach().cpu().clone()))   # image 0 = the prompt's
            return gate, rows

        layer.route = observed
    try:
        emb, mask = text_encoder.encode([prompt])
        latents = generate(model, emb, mask, steps, cfg_scale, seed)
    finally:
        for i, layer in layers:
            layer.route = originals[i]
    image = to_uint8(decode(latents))[0]                       # (H, W, 3)
    n = model.config.latent_size // model.config.patch_size
    E = layers[0][1].num_experts
    out: dict = {"prompt": prompt, "steps": steps, "cfg_scale": cfg_scale, "seed": seed, "grid": n,
                 "num_experts": E, "capacity_factor": layers[0][1].capacity_factor,
                 "eval_group_size": layers[0][1].eval_group_size, "buckets": [], "layers": []}
    ts = np.linspace(0.0, 1.0, steps + 1)
    for b in range(buckets):
        members = [s for s in range(steps) if bucket_of(s, steps, buckets) == b]
        out["buckets"].append({"index": b, "steps": [members[0], members[-1]],
                               "t": [float(ts[members[0]]), float(ts[members[-1]])]})
    for i, _ in layers:
        if len(calls[i]) != steps:
            raise RuntimeError(f"layer {i} routed {len(calls[i])} times in {steps} sampling steps")
        entry = {"layer": i, "buckets": []}
        for b in range(buckets):
            members = [s for s in range(steps) if bucket_of(s, steps, buckets) == b]
            counts = torch.stack([calls[i][s][0] for s in members]).double()       # (steps in bucket, S)
            stats = torch.stack([calls[i][s][1] for s in members]).double()        # (steps in bucket, 3)
            entry["buckets"].append({
                "experts_per_token_mean": counts.mean().item(),
                "experts_per_token_max": counts.max(dim=1).values.mean().item(),
                "unchosen_share": (counts == 0).double().mean().item(),
                "layer_stats": {"experts_per_token_mean": stats[:, 0].mean().item(),
                                "experts_per_token_max": stats[:, 1].mean().item(),
                                "unchosen_share": stats[:, 2].mean().item()},
                "experts_per_token": counts.mean(0).view(n, n).tolist(),            # heatmap, row-major grid
            })
        out["layers"].append(entry)
    out["_image"] = image
    return out


# --------------------------------------------------------------------------- figure

CELL_PX = 16
GAP = 8
LABEL_H = 28
LABEL_W = 64


def figure_layout(result: dict) -> dict:
    """Pixel origin of the image and of every (layer, bucket) panel; cell side in pixels."""
    n = result["grid"]
    cell = max(4, CELL_PX * 8 // n) if n <= 64 else 2
    side = n * cell
    x_img = GAP
    panels = {}
    for r, layer in enumerate(result["layers"]):
        y = LABEL_H + r * (side + GAP)
        for b in range(len(result["buckets"])):
            panels[f"{layer['layer']}/{b}"] = [x_img + side + GAP + LABEL_W + b * (side + GAP), y]
    width = x_img + side + GAP + LABEL_W + len(result["buckets"]) * (side + GAP)
    height = LABEL_H + len(result["layers"]) * (side + GAP) + 40
    return {"cell": cell, "side": side, "image": [x_img, LABEL_H], "panels": panels, "size": [width, height]}


def draw_figure(result: dict, path: str | Path) -> Path:
    from PIL import Image, ImageDraw

    from ecdit_dist.profiling.plot import colour, save_png

    lay = figure_layout(result)
    cell, side, E = lay["cell"], lay["side"], result["num_experts"]
    img = Image.new("RGB", tuple(lay["size"]), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    picture = Image.fromarray(result["_image"]).resize((side, side), Image.NEAREST)
    img.paste(picture, tuple(lay["image"]))
    draw.text((lay["image"][0], 4), "sample", fill=(0, 0, 0))
    for b, bucket in enumerate(result["buckets"]):
        x = lay["panels"][f"{result['layers'][0]['layer']}/{b}"][0]
        draw.text((x, 4), f"steps {bucket['steps'][0]}-{bucket['steps'][1]}", fill=(0, 0, 0))
        draw.text((x, 15), f"t {bucket['t'][0]:.2f}-{bucket['t'][1]:.2f}", fill=(0, 0, 0))
    for layer in result["layers"]:
        for b, stats in enumerate(layer["buckets"]):
            x0, y0 = lay["panels"][f"{layer['layer']}/{b}"]
            if b == 0:
                draw.text((x0 - LABEL_W + 2, y0 + side // 2 - 6), f"layer {layer['layer']}", fill=(0, 0, 0))
            for r, row in enumerate(stats["experts_per_token"]):
                for c, v in enumerate(row):
                    draw.rectangle([x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1],
                                   fill=colour(v, E))
    y = lay["size"][1] - 30                                      # colour scale 0 .. E experts per token
    x0 = lay["image"][0]
    for k in range(101):
        draw.line([x0 + 2 * k, y, x0 + 2 * k, y + 8], fill=colour(E * k / 100, E), width=2)
    draw.text((x0, y + 12), "0", fill=(0, 0, 0))
    draw.text((x0 + 196, y + 12), str(E), fill=(0, 0, 0))
    draw.text((x0 + 216, y), "experts per latent token (mean over the steps of a bucket)", fill=(0, 0, 0))
    return save_png(img, path)


def write(result: dict, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = draw_figure(result, out_dir / "routing.png")
    summary = {k: v for k, v in result.items() if not k.startswith("_")}
    summary["figure"] = figure_layout(result)
    path = out_dir / "routing.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(path)
    return {"png": png, "json": path}


# --------------------------------------------------------------------------- command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecdit profile routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  ecdit profile routing --checkpoint runs/tiny-cpu "
                                       "--prompt \"one red circle at the top left\" --steps 30 --out routing/\n")
    p.add_argument("--checkpoint", required=True, help="a run folder (its newest valid checkpoint) or checkpoints/step-N")
    p.add_argument("--prompt", required=True, help="the text of the image to sample")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's sample.steps)")
    p.add_argument("--buckets", type=int, default=4, help="groups of consecutive denoising steps (default 4)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", required=True, help="folder for routing.png and routing.json")
    p.add_argument("--json", action="store_true", help="print the summary JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    from ecdit_dist.checkpoint.manager import CheckpointError
    from ecdit_dist.config import ConfigError
    from ecdit_dist.data.storage import DataError
    from ecdit_dist.inference import load_for_sampling

    args = build_parser().parse_args(argv)
    try:
        bundle = load_for_sampling(args.checkpoint, use_ema=not args.no_ema)
        steps = args.steps or bundle.cfg.sample.steps
        scale = bundle.cfg.sample.cfg_scale if args.cfg_scale is None else args.cfg_scale
        result = profile_routing(bundle.model, bundle.text_encoder, bundle.decode, args.prompt, steps,
                                 args.buckets, scale, args.seed)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write(result, args.out)
    if args.json:
        print(paths["json"].read_text())
        return 0
    print(f"{bundle.checkpoint}: {len(result['layers'])} MoE layers, {steps} steps in {args.buckets} buckets, "
          f"E = {result['num_experts']}, f_c = {result['capacity_factor']}")
    print(f"{'layer':>5s} {'steps':>9s} {'mean':>6s} {'max':>6s} {'unchosen':>9s}   (experts per latent token)")
    for layer in result["layers"]:
        for b, s in zip(result["buckets"], layer["buckets"]):
            print(f"{layer['layer']:5d} {b['steps'][0]:4d}-{b['steps'][1]:<4d} {s['experts_per_token_mean']:6.3f} "
                  f"{s['experts_per_token_max']:6.2f} {s['unchosen_share']:9.3f}")
    print(f"wrote {paths['png']} and {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
