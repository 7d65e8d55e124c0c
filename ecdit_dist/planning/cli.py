"""Arguments and output of `ecdit plan` (registered by ecdit_dist/cli.py)."""

from __future__ import annotations

import argparse
import json


def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory, FLOPs, communication and step time of a model on a cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan a training run: per-rank memory (sharded weights, gradients, optimizer state, EMA, "
                    "FSDP gathers, activations), FLOPs, all-to-all / tensor-parallel / FSDP traffic and an "
                    "estimated step time and MFU. With --search, every valid layout, best first. "
                    "Model and assumptions: docs/PLANNING.md.",
        epilog="examples:\n"
               "  ecdit plan --preset ecdit-m-64e --nodes 8 --gpus-per-node 8 --gpu-mem-gb 80 --search\n"
               "  ecdit plan --preset ecdit-3xl-32e --nodes 1 --gpus-per-node 8 --gpu-mem-gb 80 --ep 8 --json\n"
               "  ecdit plan --config configs/tiny-cpu.yaml --nodes 1 --gpus-per-node 4 --gpu-mem-gb 16 --tp 2 --ep 2\n")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset (`ecdit presets`); paper presets plan the paper's batch of 4096 in bf16")
    src.add_argument("--config", help="a YAML run config (its train and parallel sections are used)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides, e.g. optim.ema_decay=0")
    p.add_argument("--nodes", type=int, required=True, help="nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="accelerators per node")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one accelerator, GiB (H100-80GB: 80)")
    p.add_argument("--tp", type=int, help="tensor-parallel degree")
    p.add_argument("--ep", type=int, help="expert-parallel degree")
    p.add_argument("--dp-shard", type=int, help="ZeRO-3 degree (-1 = what the world leaves)")
    p.add_argument("--dp-replicate", type=int, help="HSDP replicas")
    p.add_argument("--micro-batch", type=int, help="images per forward pass per rank (default: no accumulation)")
    p.add_argument("--global-batch-size", type=int, help="images per step (presets: 4096, the paper's)")
    p.add_argument("--activation-checkpointing", choices=["on", "off"], help="recompute blocks in backward")
    p.add_argument("--optimizer", choices=["rmsprop", "adamw"], help="optimizer (both keep two fp32 states)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="compute precision (weights stay fp32)")
    p.add_argument("--peak-tflops", type=float, help="dense peak per accelerator (default H100 SXM: 989 bf16, 495 tf32)")
    p.add_argument("--matmul-efficiency", type=float, default=0.6, help="share of the peak kernels reach (default 0.6)")
    p.add_argument("--intra-node-gbps", type=float, default=2400.0,
                   help="achievable per-GPU bandwidth inside a node, Gbit/s per direction (default 2400)")
    p.add_argument("--inter-node-gbps", type=float, default=320.0,
                   help="achievable per-GPU bandwidth between nodes, Gbit/s per direction (default 320)")
    p.add_argument("--reserve", type=float, default=0.10,
                   help="share of memory held back for CUDA context, NCCL and fragmentation (default 0.10)")
    p.add_argument("--search", action="store_true", help="plan every valid layout, best estimated throughput first")
    p.add_argument("--top", type=int, default=10, help="layouts shown by --search without --json (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON: one plan, or a best-first list with --search")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from ecdit_dist.planning import Cluster, build_config, format_plan, format_search, make_plan, search

    cfg = build_config(args.preset, args.config, args.set, tp=args.tp, ep=args.ep, dp_shard=args.dp_shard,
                       dp_replicate=args.dp_replicate, micro_batch=args.micro_batch,
                       global_batch=args.global_batch_size,
                       checkpointing=None if args.activation_checkpointing is None else args.activation_checkpointing == "on",
                       optimizer=args.optimizer, precision=args.precision)
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gb=args.gpu_mem_gb,
                      peak_tflops=args.peak_tflops, intra_node_gbps=args.intra_node_gbps,
                      inter_node_gbps=args.inter_node_gbps, reserve_frac=args.reserve,
                      matmul_efficiency=args.matmul_efficiency)
    if args.search:
        plans = search(cfg, cluster)
        print(json.dumps(plans, indent=1) if args.json else format_search(plans, args.top))
        return 0 if plans[0]["fits"] else 1
    plan = make_plan(cfg, cluster)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0 if plan["fits"] else 1
