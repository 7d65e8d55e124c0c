"""`ecdit`: the command line of ecdit-dist."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ecdit_dist.checkpoint.manager import CheckpointError
from ecdit_dist.config import ConfigError


def _cmd_params(args: argparse.Namespace) -> int:
    from ecdit_dist.config import config_from_dict, load_config
    from ecdit_dist.params import count_params
    from ecdit_dist.presets import PAPER_TABLE1

    if args.table1:
        rows = []
        for name, (total, act) in PAPER_TABLE1.items():
            cfg = config_from_dict({"model": {"preset": name}}, validate=False)
            c = count_params(cfg.model, cfg.moe)
            rows.append({"preset": name, "total_params": c["total_params"], "paper_total": total,
                         "activated_params": c["activated_params"], "paper_activated": act})
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"{'preset':15s} {'total':>9s} {'paper':>7s} {'diff':>7s}   {'activated':>9s} {'paper':>6s} {'diff':>7s}")
        for r in rows:
            dt = r["total_params"] / r["paper_total"] - 1
            da = r["activated_params"] / r["paper_activated"] - 1
            print(f"{r['preset']:15s} {r['total_params'] / 1e9:8.2f}B {r['paper_total'] / 1e9:6.2f}B {dt:+7.2%}"
                  f"   {r['activated_params'] / 1e9:8.2f}B {r['paper_activated'] / 1e9:5.2f}B {da:+7.2%}")
        return 0
    if args.preset:
        cfg = config_from_dict({"model": {"preset": args.preset}}, validate=False)
    elif args.config:
        cfg = load_config(args.config, args.set)
    else:
        print("error: give --preset NAME, --config FILE or --table1", file=sys.stderr)
        return 2
    c = count_params(cfg.model, cfg.moe)
    c["preset"] = cfg.model.preset
    if args.json:
        print(json.dumps(c))
        return 0
    print(f"model        {cfg.model.preset or args.config}")
    print(f"layers       {c['layers']} ({c['moe_layers']} MoE, {cfg.moe.num_experts} experts, {cfg.moe.router})"
          if c["moe_layers"] else f"layers       {c['layers']} (dense)")
    print(f"total        {c['total_params']:,}  ({c['total_params'] / 1e9:.2f}B)")
    print(f"activated    {c['activated_params']:,}  ({c['activated_params'] / 1e9:.2f}B)")
    print(f"backbone     {c['backbone_params']:,} total, {c['backbone_activated_params']:,} activated")
    if c["frozen_text_encoder_params"] or c["frozen_vae_params"]:
        print(f"frozen       text encoder {c['frozen_text_encoder_params']:,}, VAE {c['frozen_vae_params']:,}"
              " (declared sizes, included in total and activated)")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from ecdit_dist.presets import PRESETS

    for name, sec in PRESETS.items():
        m, e = sec["model"], sec["moe"]
        moe = f"{e['num_experts']} experts, {e.get('router', 'expert_choice')}" if e["num_experts"] else "dense"
        print(f"{name:15s} layers={m['num_layers']:<3d} d={m['hidden_dim']:<5d} heads={m['num_heads']}/"
              f"{m['num_kv_heads']:<3d} {moe}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from ecdit_dist.config import dump_config, load_config

    cfg = load_config(args.config, args.set)
    print(dump_config(cfg), end="")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from ecdit_dist.inference import load_for_sampling
    from ecdit_dist.sample import sample_grid

    bundle = load_for_sampling(args.checkpoint, use_ema=not args.no_ema)
    prompts = args.prompt or bundle.cfg.sample.prompts
    steps = args.steps or bundle.cfg.sample.steps
    scale = bundle.cfg.sample.cfg_scale if args.cfg_scale is None else args.cfg_scale
    path = sample_grid(bundle.model, bundle.text_encoder, bundle.decode, prompts, args.per_prompt, steps,
                       scale, args.seed, args.out)
    print(f"wrote {len(prompts) * args.per_prompt} samples ({len(prompts)} prompts x {args.per_prompt}) "
          f"from {bundle.checkpoint} to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecdit", description="Train, inspect and sample EC-DiT models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (one process, or under torchrun)", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)

    q = sub.add_parser("params", help="total and activated parameters of a preset or config",
                       description="Build the model on the meta device (no memory) and count its parameters.")
    q.add_argument("--preset", help="a preset name (see `ecdit presets`)")
    q.add_argument("--config", help="a YAML run config instead of a preset")
    q.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    q.add_argument("--json", action="store_true", help="print JSON (total_params, activated_params, ...)")
    q.add_argument("--table1", action="store_true", help="compare every Table 1 preset with the paper")
    q.set_defaults(func=_cmd_params)

    r = sub.add_parser("presets", help="list the architecture presets")
    r.set_defaults(func=_cmd_presets)

    c = sub.add_parser("config", help="print the resolved, validated config")
    c.add_argument("--config", help="YAML run config")
    c.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    c.set_defaults(func=_cmd_config)

    s = sub.add_parser("sample", help="generate a PNG grid from a checkpoint",
                       description="Sample images for prompts with the Euler ODE sampler and classifier-free guidance.")
    s.add_argument("--checkpoint", required=True,
                   help="a run folder (its newest valid checkpoint) or a checkpoints/step-N folder")
    s.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the run's sample.prompts")
    s.add_argument("--per-prompt", type=int, default=4, help="images per prompt (default 4)")
    s.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's sample.steps)")
    s.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the run's)")
    s.add_argument("--seed", type=int, default=0, help="noise seed")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--out", default="samples.png", help="output PNG path")
    s.set_defaults(func=_cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from ecdit_dist.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
