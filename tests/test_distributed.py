"""Every parallel layout equals one process: outputs, gradients, 5 optimizer steps (CPU, gloo).

The spawned processes are the cost: the layouts of one world size share one spawn and one
process group, and the one-process references are computed once per model variant."""

import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecdit_dist.parallel.local import run_ranks
from workers import EQUIV, QUIET, TINY, cli_train_each, collect, dead_peer, equivalence, moe_layers

pytestmark = pytest.mark.slow

STEPS = 5
# name: (world, overrides). The layouts of one world run one after the other in one spawn.
LAYOUTS = {
    "1-rank": (1, []),
    "dp2": (2, []),
    "ep2": (2, ["parallel.ep=2"]),
    "ep2-single-exchange": (2, ["parallel.ep=2", "parallel.ep_exchange=single", "moe.expert_gemm=mm_loop"]),
    "tp2": (2, ["parallel.tp=2"]),
    "hsdp2x2-ep2": (4, ["parallel.dp_replicate=2", "parallel.ep=2"]),
    "tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    "dp2-tp2-ep4-hsdp": (8, ["parallel.dp_replicate=2", "parallel.tp=2", "parallel.ep=4"]),
    "tp2-ep2-token-choice": (4, ["moe.router=token_choice", "parallel.tp=2", "parallel.ep=2"]),
    "ep2-checkpointing-accumulation": (2, ["parallel.ep=2", "train.activation_checkpointing=true",
                                           "train.micro_batch_size=4"]),
    "tp2-ep2-checkpointing": (4, ["parallel.tp=2", "parallel.ep=2", "train.activation_checkpointing=true"]),
}
# checkpointed layout: the same layout without checkpointing, whose exchanges it must not exceed
CHECKPOINTED = {"ep2-checkpointing-accumulation": "ep2", "tp2-ep2-checkpointing": "tp2-ep2"}
MODEL_KEYS = ("moe.router",)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process runs, per model variant, computed once."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    cache = {}

    def get(overrides):
        key = tuple(o for o in overrides if o.startswith(MODEL_KEYS))
        if key not in cache:
            run_dir = tmp_path_factory.mktemp("ref")
            trainer = Trainer(load_config(TINY, [*EQUIV, *key, f"run.dir={run_dir}", *QUIET]))
            cache[key] = collect(trainer, STEPS)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Every layout of one world size run in one spawn of that many ranks, once per module:
    world -> {layout: [result of rank 0, rank 1, ...]}."""
    cache: dict[int, object] = {}

    def get(world):
        if world not in cache:
            layouts = {name: o for name, (w, o) in LAYOUTS.items() if w == world}
            tmp = tmp_path_factory.mktemp(f"world{world}")
            try:
                ranks = run_ranks(equivalence, world, tmp / "ranks", layouts, str(tmp / "run"), STEPS,
                                  timeout=300 + 150 * len(layouts))
                cache[world] = {name: [r[name] for r in ranks] for name in layouts}
            except AssertionError as e:      # one failure, reported by each of its layouts, run once
                cache[world] = e
        if isinstance(cache[world], AssertionError):
            raise cache[world]
        return cache[world]

    return get


def expected_shard(name: str, full: int, world: int, overrides: list[str]) -> int:
    opts = dict(o.split("=") for o in overrides if o.startswith("parallel."))
    rep, tp, ep = int(opts.get("parallel.dp_replicate", 1)), int(opts.get("parallel.tp", 1)), int(opts.get("parallel.ep", 1))
    shard = world // (rep * tp)
    if world == 1:
        return full
    if ".experts." in name:
        return full // (ep * (shard * tp // ep))          # split over ep, ZeRO-3 over expert-data-parallel ranks
    tp_split = any(k in name for k in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                       "ffn.w1.weight", "ffn.w2.weight")) and ".experts." not in name
    return full // (shard * (tp if tp_split else 1))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_one_process(layout, references, spawned):
    world, overrides = LAYOUTS[layout]
    results = spawned(world)[layout]
    got, ref = results[0], references(overrides)

    torch.testing.assert_close(got["pred"], ref["pred"], rtol=1e-4, atol=1e-5, msg=f"{layout}: forward output")
    assert got["loss0"] == pytest.approx(ref["loss0"], rel=1e-5)
    assert got["grads"].keys() == ref["grads"].keys()
    for name in ref["grads"]:
        torch.testing.assert_close(got["grads"][name], ref["grads"][name], rtol=1e-4, atol=1e-6,
                                   msg=f"{layout}: gradient of {name}")
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), layout
    moved = max((ref["params"][n] - ref["init"][n]).abs().max().item() for n in ref["params"])
    assert moved > 1e-2                       # the 1e-4 tolerance below is far below the updates
    for name in ref["params"]:
        torch.testing.assert_close(got["params"][name], ref["params"][name], rtol=0, atol=1e-4,
                                   msg=f"{layout}: parameter {name} after {STEPS} steps")

    full = {n: t.numel() for n, t in ref["params"].items()}
    for name in ("blocks.0.attn.q_proj.weight", "blocks.0.ffn.w1.weight", "blocks.0.adaln.weight",
                 "blocks.1.ffn.experts.w1", "blocks.1.ffn.experts.w2", "blocks.1.ffn.router.weight"):
        want = expected_shard(name, full[name], world, overrides)
        for rank, r in enumerate(results):
            assert r["shards"][name] == want, (layout, rank, name, r["shards"][name], want)


@pytest.mark.parametrize("layout", list(CHECKPOINTED))
def test_checkpointing_repeats_no_exchange(layout, spawned):
    """The recompute of a checkpointed block reuses its all-to-all and tp-gather outputs: per
    micro-batch a training step sends exactly as many as without checkpointing, namely (per
    exchange form per_expert, the gloo default) E/ep calls for each of dispatch and combine,
    forward and backward, in each MoE layer; and one tp gather forward, one backward."""
    world, overrides = LAYOUTS[layout]
    plain = CHECKPOINTED[layout]
    runs = spawned(world)
    ep = int(dict(o.split("=") for o in overrides)["parallel.ep"])
    tp = int(dict(o.split("=") for o in overrides).get("parallel.tp", 1))
    moe_layers, experts = 2, 4                                   # the tiny config
    for rank in range(world):
        got, base = runs[layout][rank], runs[plain][rank]
        per_micro = {k: v / got["micro_batches"] for k, v in got["exchanges"].items()}
        base_per_micro = {k: v / base["micro_batches"] for k, v in base["exchanges"].items()}
        assert per_micro == base_per_micro, (layout, rank, got["exchanges"], base["exchanges"])
        assert per_micro["all_to_all"] == moe_layers * 4 * (experts // ep), (layout, rank, per_micro)
        assert per_micro["tp_gather"] == (moe_layers * 2 if tp > 1 else 0), (layout, rank, per_micro)


CASES = [("expert_choice", "per_expert", "auto"), ("expert_choice", "single", "auto"),
         ("expert_choice", "single", "mm_loop"), ("token_choice", "single", "auto")]


@pytest.fixture(scope="module")
def moe_layer_runs(tmp_path_factory):
    """Every case of the expert-parallel layer test in one spawn of 4 ranks (ep = 4)."""
    seed = random.SystemRandom().randrange(2**31)
    results = run_ranks(moe_layers, 4, tmp_path_factory.mktemp("moe"), seed, CASES, timeout=300)
    return seed, {case: [r[i] for r in results] for i, case in enumerate(CASES)}


@pytest.mark.parametrize("router,exchange,gemm", CASES)
def test_expert_parallel_layer_equals_one_process(router, exchange, gemm, moe_layer_runs):
    seed, runs = moe_layer_runs
    results = runs[(router, exchange, gemm)]
    world = len(results)
    router_grad = sum(r["router_grad"] for r in results)
    if router == "expert_choice" and gemm == "auto":    # timings summed over ranks: one plan everywhere
        assert len(results[0]["plans"]) == 1 and all(r["plans"] == results[0]["plans"] for r in results)
    for rank, r in enumerate(results):
        assert r["w1_shape"][0] == 8 // world
        torch.testing.assert_close(r["out"], r["ref_out"], rtol=1e-5, atol=1e-6, msg=f"seed {seed} rank {rank}")
        torch.testing.assert_close(r["dx"], r["ref_dx"], rtol=1e-5, atol=1e-6, msg=f"seed {seed} rank {rank}")
        torch.testing.assert_close(r["w1_grad"], r["ref_w1_grad"], rtol=1e-4, atol=1e-6, msg=f"seed {seed}")
        assert r["host_syncs"] == [], (rank, r["host_syncs"])
    torch.testing.assert_close(router_grad, results[0]["ref_router_grad"], rtol=1e-4, atol=1e-6)


def _run_group(cmd: list[str], timeout: int):
    """Run `cmd` as a new process group; on timeout kill all of it (torchrun and its ranks)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{cmd[-8:]} did not finish within {timeout}s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(nproc: int, overrides: list[str], tmp_path: Path, timeout: int = 180):
    """Run the real entry point under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ecdit_dist.train", "--config", str(TINY), "--set", f"run.dir={tmp_path}", *QUIET, *overrides]
    return _run_group(cmd, timeout)


BAD_LAYOUTS = [
    (["parallel.ep=3"], "parallel.ep (3) must divide moe.num_experts (4)"),
    (["parallel.tp=4"], "model.num_kv_heads (2) must be divisible by parallel.tp (4)"),
    (["parallel.dp_shard=3"], "but the world size is 4"),
    (["parallel.tp=2", "moe.group_size=512"], "moe.group_size (512) must divide the tokens each rank routes"),
]


@pytest.fixture(scope="module")
def bad_layout_runs(tmp_path_factory):
    """`ecdit train` with every bad layout, one after the other in one spawn of 4 ranks."""
    tmp = tmp_path_factory.mktemp("bad")
    argvs = [["--config", str(TINY), "--set", f"run.dir={tmp}/{i}", *QUIET, *overrides]
             for i, (overrides, _) in enumerate(BAD_LAYOUTS)]
    return run_ranks(cli_train_each, 4, tmp / "ranks", argvs, timeout=120)


@pytest.mark.parametrize("case", range(len(BAD_LAYOUTS)), ids=[" ".join(o) for o, _ in BAD_LAYOUTS])
def test_bad_layout_fails_on_every_rank_without_hanging(case, bad_layout_runs):
    message = BAD_LAYOUTS[case][1]
    for rank, per_rank in enumerate(bad_layout_runs):
        code, err = per_rank[case]
        assert code == 2 and f"error (rank {rank}): " in err and message in err, (rank, err)


def test_bad_layout_under_torchrun_exits_with_the_message(tmp_path):
    out = _torchrun(4, ["parallel.ep=3"], tmp_path)
    assert out.returncode != 0 and "parallel.ep (3) must divide moe.num_experts (4)" in out.stderr


def test_dead_peer_raises_instead_of_hanging(tmp_path):
    with pytest.raises(AssertionError) as info:
        run_ranks(dead_peer, 2, tmp_path / "ranks", str(tmp_path / "run"), timeout=150)
    assert "did not finish" not in str(info.value)       # an error, not a hang
    assert (tmp_path / "ranks" / "rank0.err").exists()


def test_ecdit_train_nproc_starts_torchrun_and_writes_global_mean_loss(tmp_path):
    """`ecdit train --nproc 4` execs torchrun on the real entry point (python -m
    ecdit_dist.train): tp2 x ep2 trains, logs the global mean loss and commits a checkpoint."""
    out = _run_group([sys.executable, "-m", "ecdit_dist.cli", "train", "--nproc", "4", "--config", str(TINY),
                      "--set", f"run.dir={tmp_path}", "train.steps=3", "logging.interval=1", "parallel.tp=2",
                      "parallel.ep=2", *QUIET], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 4 = dp_replicate 1 x dp_shard 2 x tp 2; ep 2" in out.stdout
    from ecdit_dist.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "checkpoints" / "step-00000003" / "manifest.json").exists()
