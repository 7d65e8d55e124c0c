"""The planner against the real code: shard sizes, activations, FLOPs and all-to-all bytes of a
measured training step on 1, 2 and 4 CPU ranks; shard shapes of the 97B model at full scale on
the fake process group; the --search contract; every Table 1 preset; bad inputs."""

import json
import subprocess
import sys

import pytest

from ecdit_dist.config import ConfigError, load_config
from ecdit_dist.parallel.dims import ParallelDims
from ecdit_dist.planning import Cluster, build_config, make_plan, search
from ecdit_dist.planning.estimate import TP_SPLIT_PARTS, a2a_bytes, activations, forward_flops, step_flops
from ecdit_dist.planning.shards import inventory, local_numels, local_shape
from ecdit_dist.presets import PAPER_TABLE1
from plan_workers import measure
from workers import QUIET, RUN, TINY, jobs_per_world


# name: (world, overrides); optimizer and EMA on, so their states are measured too
MEASURED = {
    "1-rank": (1, []),
    "dp2-checkpointing-accumulation": (2, ["train.activation_checkpointing=true", "train.micro_batch_size=8"]),
    "ep2": (2, ["parallel.ep=2", "optim.name=rmsprop"]),
    "tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    "hsdp2x2-ep2-checkpointing": (4, ["parallel.dp_replicate=2", "parallel.ep=2", "train.activation_checkpointing=true"]),
}


def counter_flops(cfg, dims, micro, checkpointing):
    """What torch's FLOP counter reports for the planned step: it sees a tensor-parallel (DTensor)
    matmul once, at its global shape, so the parts tp splits by weights count tp times."""
    flops = step_flops(cfg, dims, micro, checkpointing)
    if dims.tp > 1:
        assert not checkpointing, "the conversion below assumes no recompute"
        parts = forward_flops(cfg, dims, micro)
        flops += (dims.tp - 1) * 3 * sum(parts[k] for k in TP_SPLIT_PARTS)
    return flops


def measured_overrides(layout: str) -> list[str]:
    return [*MEASURED[layout][1], "optim.ema_decay=0.99", "train.precision=fp32"]   # as the CPU run computes


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """layout -> the measurements of every rank. The layouts of one world size run one after the
    other in one spawn (workers.jobs: each starts as in a fresh rank), once per module."""
    get = jobs_per_world(tmp_path_factory, {n: (w, measure, (measured_overrides(n), RUN))
                                            for n, (w, _) in MEASURED.items()})
    return lambda layout: get(layout)[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(MEASURED))
def test_plan_equals_measured_step(layout, measured):
    world = MEASURED[layout][0]
    overrides = measured_overrides(layout)
    got = measured(layout)

    cfg = load_config(TINY, [*overrides, *QUIET])
    dims = ParallelDims.from_config(cfg, world)
    params = inventory(cfg)
    per_rank = cfg.train.global_batch_size // dims.dp
    micro = cfg.train.micro_batch_size or per_rank
    ac = cfg.train.activation_checkpointing
    states = 2                                    # RMSProp with momentum and AdamW both keep two
    plan = make_plan(cfg, Cluster(nodes=1, gpus_per_node=world, gpu_mem_gb=16))
    act = activations(cfg, dims, micro, ac)["held"]
    for rank, m in enumerate(got):
        numel = sum(local_numels(params, dims, rank).values())
        assert m["params"] == numel * 4, (layout, rank)
        assert m["grads"] == numel * 4, (layout, rank)
        assert m["optimizer"] == numel * 4 * states, (layout, rank)
        assert m["ema"] == numel * 4, (layout, rank)
        assert abs(act / m["activations"] - 1) <= 0.10, (layout, rank, act, m["activations"])
        flops = counter_flops(cfg, dims, micro, ac) * (per_rank // micro)
        assert abs(flops / m["flops"] - 1) <= 0.05, (layout, rank, flops, m["flops"])
        assert m["a2a_bytes"] == a2a_bytes(cfg, dims, micro, ac) * (per_rank // micro), (layout, rank)
    # rank 0 holds the largest shards: the plan reports it
    assert plan["per_rank"]["params_bytes"] == got[0]["params"]
    assert plan["per_rank"]["activations_bytes"] == act
    assert plan["step"]["a2a_bytes_per_rank"] == got[0]["a2a_bytes"]
    if dims.ep > 1:
        assert got[0]["a2a_bytes"] > 0


def _fake_shapes(args):
    code = ("import json, sys; from ecdit_dist.planning import build_config; "
            "from ecdit_dist.planning.shards import measure_shards; "
            "a = json.loads(sys.argv[1]); cfg = build_config(a['preset'], tp=a['tp'], ep=a['ep'], "
            "dp_replicate=a['rep'], dp_shard=-1); "
            "print(json.dumps(measure_shards(cfg, a['world'], a['rank'])))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {k: tuple(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.slow
def test_shard_shapes_of_97b_on_64_ranks_match_fake_process_group():
    """EC-DiT-M-64E parallelized for real (meta device, fake process group) as rank 45 of 64 with
    HSDP, tp and ep: every local shard has the planned shape."""
    args = dict(preset="ecdit-m-64e", world=64, rank=45, tp=2, ep=8, rep=2)
    built = _fake_shapes(args)
    cfg = build_config("ecdit-m-64e", tp=2, ep=8, dp_replicate=2, dp_shard=-1)
    dims = ParallelDims.from_config(cfg, 64)
    planned = {p.name: local_shape(p, dims, 45) for p in inventory(cfg)}
    assert built == planned


def test_search_97b_on_64_h100():
    cfg = build_config("ecdit-m-64e")
    plans = search(cfg, Cluster(nodes=8, gpus_per_node=8, gpu_mem_gb=80))
    fitting = [p for p in plans if p["fits"]]
    assert fitting and plans[0]["fits"]
    times = [p["step"]["time_s"] for p in fitting]
    assert times == sorted(times)
    assert all(p["reason"] for p in plans)
    top = plans[0]["layout"]
    trial = build_config("ecdit-m-64e", tp=top["tp"], ep=top["ep"], dp_shard=top["dp_shard"],
                         dp_replicate=top["dp_replicate"], micro_batch=top["micro_batch_size"])
    dims = ParallelDims.from_config(trial, 64)          # the layout checks accept it
    assert dims.world == 64
    pr = plans[0]["per_rank"]
    assert pr["total_bytes"] + pr["reserve_bytes"] <= 80 * 2 ** 30


@pytest.mark.parametrize("preset", list(PAPER_TABLE1))
def test_plan_builds_for_every_table1_preset(preset):
    from ecdit_dist.params import count_params

    cfg = build_config(preset)
    cluster = Cluster(nodes=2, gpus_per_node=8, gpu_mem_gb=80)
    plan = make_plan(cfg, cluster)
    pr, step = plan["per_rank"], plan["step"]
    parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "ema_bytes", "gathered_bytes", "activations_bytes",
             "backward_peak_extra_bytes", "a2a_buffer_bytes")
    assert pr["total_bytes"] == sum(pr[k] for k in parts)
    assert plan["fits"] == (pr["total_bytes"] + pr["reserve_bytes"] <= pr["capacity_bytes"])
    assert 0 < step["mfu"] < 1 and step["time_s"] > 0 and step["flops"] >= step["model_flops"] > 0
    # the shards of all ranks add up to the parameter count of params.py, once per replica
    params = inventory(cfg)
    dims = ParallelDims.from_config(cfg, 16)
    held = sum(sum(local_numels(params, dims, r).values()) for r in range(16))
    assert held == count_params(cfg.model, cfg.moe)["backbone_params"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dense-xl", "ecdit-m-64e"])
def test_forward_flops_equal_flop_counter_at_full_scale(preset):
    """The full model's forward on fake tensors (shapes only, no memory) under torch's FLOP counter."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from ecdit_dist.model import ECDiT
    from plan_workers import count_cpu_attention

    count_cpu_attention()
    cfg = build_config(preset)
    m, B = cfg.model, 8                            # 8 x 128 tokens = one routing group of 1024
    with FakeTensorMode():
        model = ECDiT(m, cfg.moe)
        x = torch.empty(B, m.in_channels, m.latent_size, m.latent_size)
        text = torch.empty(B, m.text_len, m.text_dim)
        mask = torch.ones(B, m.text_len, dtype=torch.bool)
        keep = torch.zeros(B, m.train_tokens_per_image, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, torch.empty(B), text, mask, keep=keep, drop_text=torch.zeros(B, dtype=torch.bool))
    one = ParallelDims(world=1, dp_replicate=1, dp_shard=1, tp=1, ep=1)
    planned = sum(forward_flops(cfg, one, B).values())
    assert planned == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_bad_inputs_fail_clearly():
    cfg = build_config("ecdit-m-64e")
    with pytest.raises(ConfigError, match="at least one GPU"):
        make_plan(cfg, Cluster(nodes=1, gpus_per_node=0, gpu_mem_gb=80))
    with pytest.raises(ConfigError, match="unknown preset 'ecdit-huge'.*ecdit-m-64e"):
        build_config("ecdit-huge")
    with pytest.raises(ConfigError, match=r"parallel.ep \(3\) must divide moe.num_experts \(64\)"):
        make_plan(build_config("ecdit-m-64e", ep=3), Cluster(nodes=1, gpus_per_node=6, gpu_mem_gb=80))
    with pytest.raises(ConfigError, match="not divisible by parallel.dp_replicate x parallel.tp"):
        make_plan(build_config("ecdit-m-64e", tp=3), Cluster(nodes=1, gpus_per_node=8, gpu_mem_gb=80))


def test_cli_plan_json_contract_and_errors():
    run = [sys.executable, "-m", "ecdit_dist.cli", "plan"]
    out = subprocess.run(run + ["--preset", "ecdit-3xl-32e", "--nodes", "1", "--gpus-per-node", "8",
                                "--gpu-mem-gb", "80", "--ep", "8", "--json"],
                         capture_output=True, text=True, timeout=300)
    plan = json.loads(out.stdout)
    assert out.returncode == (0 if plan["fits"] else 1)
    assert plan["world"] == 8 and plan["layout"]["ep"] == 8
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "total_bytes"):
        assert isinstance(plan["per_rank"][key], int)
    for key in ("flops", "a2a_bytes_per_rank", "time_s", "mfu"):
        assert plan["step"][key] > 0
    bad = subprocess.run(run + ["--preset", "ecdit-m-64e", "--nodes", "1", "--gpus-per-node", "8",
                                "--gpu-mem-gb", "80", "--ep", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "parallel.ep (3) must divide" in bad.stderr
    too_big = subprocess.run(run + ["--preset", "ecdit-m-64e", "--nodes", "1", "--gpus-per-node", "8",
                                    "--gpu-mem-gb", "80", "--ep", "8"], capture_output=True, text=True, timeout=300)
    assert too_big.returncode == 1 and "DOES NOT FIT" in too_big.stdout and "GiB over" in too_big.stdout


def test_train_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, "-m", "ecdit_dist.cli", "train", "--config", str(TINY), "--nproc", "4", "--dry-run",
             "--set", "parallel.tp=2", "parallel.ep=2", f"run.dir={run}"]
    out = subprocess.run(train, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dp_shard 2 x tp 2, ep 2" in out.stdout
    assert "as rank 0 of 4" in out.stdout and "every shape as planned" in out.stdout
    assert not run.exists()
    bad = subprocess.run(train + ["parallel.ep=3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "parallel.ep (3) must divide moe.num_experts (4)" in bad.stderr
