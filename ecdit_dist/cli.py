"""`ecdit`: the command line of ecdit-dist."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ecdit_dist.checkpoint.manager import CheckpointError
from ecdit_dist.checkpoint.tensors import ConvertError
from ecdit_dist.config import ConfigError
from ecdit_dist.data.storage import DataError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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

    bundle = load_for_sampling(args.checkpoint, use_ema=not args.no_ema, device=args.device,
                               precision=args.precision)
    prompts = args.prompt or bundle.cfg.sample.prompts
    steps = args.steps or bundle.cfg.sample.steps
    scale = bundle.cfg.sample.cfg_scale if args.cfg_scale is None else args.cfg_scale
    path = sample_grid(bundle.model, bundle.text_encoder, bundle.decode, prompts, args.per_prompt, steps,
                       scale, args.seed, args.out, bundle.autocast_dtype)
    print(f"wrote {len(prompts) * args.per_prompt} samples ({len(prompts)} prompts x {args.per_prompt}) "
          f"from {bundle.checkpoint} to {path}")
    return 0


def _bar(desc: str, total: int | None = None, unit: str = "B"):
    """A progress bar on a terminal; operations that learn their size later set `total` themselves."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000, desc=desc,
                disable=not sys.stderr.isatty())


def _dtype(name: str | None):
    import torch

    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _report(result: dict, as_json: bool, dry_run: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=1, default=str))
        return
    if dry_run:
        print("dry run, nothing written:")
    for k, v in result.items():
        if k != "tensors" or not isinstance(v, dict):
            print(f"  {k}: {v}")


def _cmd_convert(args: argparse.Namespace) -> int:
    from ecdit_dist.checkpoint import convert as C

    op = args.op
    if op == "inspect":
        report = C.inspect(args.path, verify=not args.no_verify, ema=args.ema)
        if args.json:
            print(json.dumps(report, indent=1, default=str))
            return 0 if report["matches_config"] is True else 1
        for name, t in report["tensors"].items():
            print(f"{name:60s} {str(tuple(t['shape'])):24s} {t['dtype']}")
        print(f"{len(report['tensors'])} tensors, {report['total_params']:,} parameters, "
              f"{report['total_bytes'] / 2**20:.1f} MiB")
        if "verified_files" in report:
            print(f"step {report['step']}, layout {report['layout']}; {report['verified_files']} files match "
                  f"their sha256 in the manifest")
        print("matches its config" if report["matches_config"] is True else f"PROBLEM: {report['matches_config']}")
        return 0 if report["matches_config"] is True else 1
    if op == "export":
        with _bar("export") as bar:
            result = C.export(args.checkpoint, args.out, args.max_shard_size, _dtype(args.dtype), args.ema,
                              args.dry_run, bar, overwrite=args.overwrite, verify=args.verify, workers=args.workers)
    elif op == "import":
        with _bar("import") as bar:
            result = C.import_(args.src, args.run_dir, args.dry_run, bar, group_size=args.group_size)
    elif op == "merge":
        tensor_weights = json.loads(Path(args.tensor_weights).read_text()) if args.tensor_weights else None
        with _bar("merge") as bar:
            result = C.merge(args.inputs, args.out, args.weights, tensor_weights, args.max_shard_size,
                             _dtype(args.dtype), args.ema, args.dry_run, bar, overwrite=args.overwrite,
                             verify=args.verify, workers=args.workers)
    elif op == "upcycle":
        with _bar("upcycle") as bar:
            result = C.upcycle(args.src, args.out, args.experts, args.noise, args.router_std, args.seed,
                               args.capacity_factor, args.max_shard_size, args.dry_run, bar, overwrite=args.overwrite,
                               workers=args.workers)
    else:  # deepspeed
        result = C.from_deepspeed(args.checkpoint, args.out, args.config, args.tag, args.max_shard_size, args.dry_run,
                                  overwrite=args.overwrite)
    _report(result, args.json, args.dry_run)
    return 0


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="export, import, merge, upcycle and inspect checkpoints",
                       description="Convert checkpoints. Every converter checks the tensors against the model's "
                                   "config and fails naming missing, leftover or mis-shaped tensors. Every input "
                                   "and output may be s3://bucket/prefix: read with ranged GETs, a tensor at a "
                                   "time; written a few shards at a time with checksummed (multipart) uploads, "
                                   "config.json last as the commit marker (docs/CHECKPOINTS.md, 'On S3').")
    ops = c.add_subparsers(dest="op", required=True, metavar="OP")

    def common(p, writes: bool = True, replaces: bool = True):
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        if writes:
            p.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan; write nothing")
            p.add_argument("--max-shard-size", default="5GB", help="split output files at this size (e.g. 2GB; 0 = one file)")
        if writes and replaces:
            p.add_argument("--overwrite", action="store_true",
                           help="replace a non-empty output folder whole (it is refused otherwise); on S3 "
                                "the old output is deleted before the new one is written")
        p.set_defaults(func=_cmd_convert)

    def streaming(p, verify: bool = True):
        p.add_argument("--workers", type=int, default=4,
                       help="threads reading and writing output shards in parallel (default 4); memory does not "
                            "grow with it: two staging buffers are shared")
        if verify:
            p.add_argument("--verify", choices=["sha256", "size"], default="sha256",
                           help="check training-checkpoint inputs against their manifest: sha256 of every file, "
                                "hashed while the conversion runs and required before the output is committed "
                                "(default; for checkpoints from elsewhere), or sizes only (trusted inputs, e.g. "
                                "written by this cluster)")

    e = ops.add_parser("export", help="training checkpoint -> consolidated safetensors + config.json",
                       description="Stream a training checkpoint (any layout) into consolidated safetensors, "
                                   "one tensor in memory at a time.")
    e.add_argument("--checkpoint", required=True, help="run folder (newest valid checkpoint) or checkpoints/step-N; "
                                                       "or s3://... (a step folder, or a run prefix with checkpoints/latest)")
    e.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    e.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="cast floating tensors")
    e.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    common(e)
    streaming(e)

    i = ops.add_parser("import", help="consolidated safetensors -> a training checkpoint any layout starts from",
                       description="Write consolidated weights as a step-0 checkpoint in RUN_DIR; `ecdit train` with "
                                   "run.dir=RUN_DIR on any layout then starts from them (fresh optimizer).")
    i.add_argument("--src", required=True, help="folder with *.safetensors (+ index) and config.json, or one file "
                                                "(local or s3://)")
    i.add_argument("--run-dir", required=True, help="run folder to create the checkpoint in; s3://bucket/run uploads "
                                                    "it in the layout of checkpoint.mirror (staged on local disk)")
    i.add_argument("--group-size", default="64MiB",
                   help="tensors are read and written in groups up to this size (a larger tensor alone); "
                        "peak memory is at most 2x (fp32) or 4x (bf16/fp16) max(largest tensor, group size) + 64 MiB "
                        "(default 64MiB)")
    common(i, replaces=False)
    i.set_defaults(max_shard_size=None)

    m = ops.add_parser("merge", help="average checkpoints, or re-shard / join one",
                       description="Weighted average of checkpoints with identical architectures, tensor by tensor. "
                                   "With one input it re-shards (e.g. --max-shard-size 0 joins shards into one file).")
    m.add_argument("inputs", nargs="+", help="training checkpoints or consolidated safetensors (local or s3://)")
    m.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    m.add_argument("--weights", type=float, nargs="+", help="one weight per input (default: equal)")
    m.add_argument("--tensor-weights", help='JSON file {"glob pattern": [w1, w2, ...]}; first match wins')
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    m.add_argument("--ema", action="store_true", help="read the EMA weights of training checkpoints")
    common(m)
    streaming(m)

    u = ops.add_parser("upcycle", help="dense checkpoint -> EC-DiT with n experts per MoE layer",
                       description="Each expert of a MoE layer starts as a copy of that layer's dense FFN "
                                   "(plus optional noise); the router starts random.")
    u.add_argument("--src", required=True, help="dense training checkpoint or consolidated safetensors (local or s3://)")
    u.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    u.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    u.add_argument("--noise", type=float, default=0.0, help="noise std, relative to each weight's std (default 0)")
    u.add_argument("--router-std", type=float, default=0.02, help="std of the new router weights")
    u.add_argument("--capacity-factor", type=float, default=None, help="set moe.capacity_factor of the new model")
    u.add_argument("--seed", type=int, default=0)
    common(u)
    streaming(u, verify=False)

    n = ops.add_parser("inspect", help="tensors, shapes, dtypes, totals, checksum verification")
    n.add_argument("path", help="training checkpoint (run or step folder) or consolidated safetensors (local or s3://)")
    n.add_argument("--ema", action="store_true", help="list the EMA tensors")
    n.add_argument("--no-verify", action="store_true", help="skip the sha256 verification")
    common(n, writes=False)

    d = ops.add_parser("deepspeed", help="DeepSpeed ZeRO checkpoint (no expert parallelism) -> consolidated",
                       description="Consolidate a DeepSpeed ZeRO stage 1-3 checkpoint of an ECDiT through "
                                   "deepspeed's zero_to_fp32 reader.")
    d.add_argument("--checkpoint", required=True, help="the DeepSpeed checkpoint folder (holding 'latest'); an s3:// "
                                                       "prefix is downloaded to a temporary folder first")
    d.add_argument("--config", required=True, help="the run config of the model")
    d.add_argument("--tag", default=None, help="checkpoint tag (default: the one in 'latest')")
    d.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    common(d)


def _cmd_data(args: argparse.Namespace) -> int:
    from ecdit_dist.data import tools

    op = args.op
    if op == "synth":
        if args.dry_run:
            result = {"out": args.out, "samples": args.num, "shards": -(-args.num // args.shard_rows)}
        else:
            with _bar("synth", args.num, unit="samples") as bar:
                result = tools.synth(args.out, args.num, args.latent_size, args.shard_rows, args.row_group,
                                     args.seed, args.dtype, bar.update)
    elif op == "encode":
        from ecdit_dist.data.text import build_text_encoder

        text_dim = 64 if args.text_dim is None and args.encoder == "tiny" else args.text_dim
        encoder = build_text_encoder(args.encoder, text_dim, args.text_len)
        result = tools.encode(args.path, encoder, args.batch_size)
    elif op == "index":
        if args.dry_run:
            result = {"index": tools.dataset_index.index_url(args.path), "writes": False}
        else:
            with _bar("index", None, unit="shards") as bar:
                result = tools.index(args.path, on_error="skip" if args.skip_bad else "raise", progress=bar.update)
    elif op == "stats":
        result = tools.stats(args.path, on_error="skip" if args.skip_bad else "raise")
    elif op == "upload":
        result = tools.upload(args.src, args.dest)
    else:
        result = tools.verify(args.url, args.local, args.deep)
    _report(result, args.json, getattr(args, "dry_run", False))
    return 0


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="make, encode, inspect and upload Parquet shards",
                       description="Parquet shards of latents and captions (docs/DATA.md), on disk or in S3.")
    ops = d.add_subparsers(dest="op", required=True, metavar="OP")

    def common(p):
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.set_defaults(func=_cmd_data)

    s = ops.add_parser("synth", help="write the embedded shapes dataset as shards")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--num", type=positive_int, default=20000, help="samples (default 20000)")
    s.add_argument("--latent-size", type=int, default=16, help="latent side (images are twice as wide)")
    s.add_argument("--shard-rows", type=positive_int, default=4096, help="rows per shard file")
    s.add_argument("--row-group", type=positive_int, default=256, help="rows per Parquet row group")
    s.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="latent storage type")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    common(s)

    e = ops.add_parser("encode", help="add text embeddings (text_emb, text_len) to local shards, in place")
    e.add_argument("path", help="local folder of shards")
    e.add_argument("--encoder", required=True, help='"tiny" or a local T5 encoder folder')
    e.add_argument("--text-len", type=int, required=True, help="tokens per caption (pad / truncate)")
    e.add_argument("--text-dim", type=int, default=None,
                   help="width of the embeddings: the tiny encoder's (default 64); for T5, checked against its d_model")
    e.add_argument("--batch-size", type=int, default=64)
    common(e)

    x = ops.add_parser("index", help="write the dataset index (ecdit-index.json) of existing shards",
                       description="Read every shard's footer and checksum (local: hashed; S3: the sha256 "
                                   "recorded at upload, else hashed) and write PATH/ecdit-index.json atomically. "
                                   "Training then reads this one object at start instead of every footer.")
    x.add_argument("path", help="local folder or s3://bucket/prefix")
    x.add_argument("--skip-bad", action="store_true", help="leave unreadable shards out instead of failing")
    x.add_argument("--dry-run", action="store_true", help="print where the index would go; write nothing")
    common(x)

    t = ops.add_parser("stats", help="counts, sizes, schema and metadata of a dataset")
    t.add_argument("path", help="local folder or s3://bucket/prefix")
    t.add_argument("--skip-bad", action="store_true", help="report unreadable shards instead of failing")
    common(t)

    u = ops.add_parser("upload", help="upload a folder to s3://bucket/prefix and verify it")
    u.add_argument("src", help="local folder")
    u.add_argument("dest", help="s3://bucket/prefix")
    common(u)

    v = ops.add_parser("verify", help="check objects in S3 against a local folder or their recorded sha256")
    v.add_argument("url", help="s3://bucket/prefix")
    v.add_argument("--local", default=None, help="local folder the objects came from")
    v.add_argument("--deep", action="store_true", help="re-hash every object by reading it back")
    common(v)


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
    s.add_argument("--steps", type=positive_int, default=None, help="Euler steps (default: the run's sample.steps)")
    s.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the run's)")
    s.add_argument("--seed", type=int, default=0, help="noise seed")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--out", default="samples.png", help="output PNG path")
    s.add_argument("--device", default="auto",
                   help="auto (the first GPU when CUDA is available, else the CPU), cpu, cuda or cuda:N")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto = bf16 autocast on a GPU, fp32 on the CPU")
    s.set_defaults(func=_cmd_sample)

    _add_convert(sub)
    _add_data(sub)

    from ecdit_dist.planning.cli import add_plan_parser

    add_plan_parser(sub)
    from ecdit_dist.evaluation import add_eval_parser

    add_eval_parser(sub)
    f = sub.add_parser("profile", help="profile all-to-all bandwidth (a2a) or expert routing (routing)",
                       add_help=False)
    f.add_argument("rest", nargs=argparse.REMAINDER)
    from ecdit_dist.launch.cli import add_launch

    add_launch(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from ecdit_dist.train import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "profile":
        from ecdit_dist.profiling.cli import main as profile_main

        return profile_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError, ConvertError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
