"""CPU twins of the GPU code paths: what the first NCCL + CUDA + bf16 run relies on, checked here
with gloo on CPU ranks (the GPU versions are in tests/test_gpu.py)."""

import pytest
import torch

from ecdit_dist.config import ConfigError
from ecdit_dist.device import autocast_dtype, process_group_backend, select_device, to_device
from gpu_workers import (audit_collectives, audited_run, bf16_run, host_reads, init_weights, sample_at_end,
                         sharded_samples)
from workers import RUN, jobs, jobs_per_world, leave_state_behind, process_state

# bf16 layouts against one bf16 process: loss of each of the first steps, relative. The TP row-parallel
# projections add bf16 partial products across ranks (one extra bf16 rounding per sub-layer).
BF16_LOSS_RTOL = 2e-2

EP2, TP2, TP2_EP2 = ["parallel.ep=2"], ["parallel.tp=2"], ["parallel.tp=2", "parallel.ep=2"]
# The spawned runs of this file, name: (world, worker, args). A spawn and its torch import cost more than
# most of these runs: the jobs of one world size run one after the other in one spawn (workers.jobs,
# which gives each job the state of a fresh rank), once per module, when a test first asks for them.
JOBS = {
    "state at start": (1, process_state, ()),
    "leave state behind": (1, leave_state_behind, ()),
    "state after it": (1, process_state, ()),
    "bf16 1-rank": (1, bf16_run, ([], RUN, 3)),
    "init reference": (1, init_weights, ([], RUN)),
    "init 1-rank": (1, init_weights, ([], RUN)),
    "sample 1-rank": (1, sample_at_end, ([], RUN)),
    "audit ep2": (2, audited_run, (RUN,)),
    "init ep2": (2, init_weights, (EP2, RUN)),
    "sample ep2": (2, sample_at_end, (EP2, RUN)),
    "host reads ep2": (2, host_reads, (EP2, RUN, 3)),
    "sharded samples tp2": (2, sharded_samples, (TP2, RUN)),
    "bf16 tp2-ep2": (4, bf16_run, (TP2_EP2, RUN, 3)),
    "init tp2-ep2": (4, init_weights, (TP2_EP2, RUN)),
    "sharded samples tp2-ep2": (4, sharded_samples, (TP2_EP2, RUN)),
}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """job name -> (results of rank 0, 1, ..., its run directory); one spawn per world size."""
    return jobs_per_world(tmp_path_factory, JOBS)


@pytest.mark.slow
def test_jobs_of_one_spawn_start_as_in_a_fresh_rank(spawned):
    """workers.jobs undoes what a job leaves behind: a process group, replaced functions, torch's
    switches and random streams, environment, signal routing, expert GEMM plans, warnings filters."""
    fresh, left, after = (spawned(name)[0][0] for name in ("state at start", "leave state behind", "state after it"))
    assert after == fresh
    assert not [key for key in fresh if left[key] == fresh[key]], "the job did not change every entry"


def test_a_failing_job_is_named(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "0")
    with pytest.raises(RuntimeError, match=r"job 'bad args' \(process_state, 1 of 2\) failed on rank 0: TypeError"):
        jobs(0, 1, [("bad args", process_state, ("extra",)), ("never run", process_state, ())])


def test_backend_puts_gloo_beside_nccl_and_refuses_gloo_with_cuda():
    assert process_group_backend("auto", "cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("nccl", "cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("auto", "cpu") == "gloo"
    with pytest.raises(ConfigError, match="parallel.backend=gloo with CUDA"):
        process_group_backend("gloo", "cuda")
    with pytest.raises(ConfigError, match="needs CUDA"):
        process_group_backend("nccl", "cpu")


def test_precision_auto_is_bf16_on_cuda_only():
    assert autocast_dtype("auto", "cuda") == torch.bfloat16
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16


def test_device_mapping_tolerates_one_gpu_per_task(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device(5) == torch.device("cuda", 0)       # srun --gpus-per-task=1: LOCAL_RANK 5 sees one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert select_device(5) == torch.device("cuda", 5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match="LOCAL_RANK=5 but this process sees 4 GPUs"):
        select_device(5)


def test_batch_transfer_is_identity_on_cpu():
    x, m = torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool)
    a, b, c = to_device([x, None, m], torch.device("cpu"))
    assert a is x and b is None and c is m


def test_audit_rejects_a_cpu_tensor_when_the_device_is_not_cpu(tmp_path):
    """The audit used below really fails on a CPU tensor when the training device is CUDA."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        calls: list = []
        with audit_collectives("cuda", calls), pytest.raises(RuntimeError, match="NCCL-only group would fail"):
            dist.all_reduce(torch.ones(1))
        assert calls == [("all_reduce", ("cpu",))]
        calls.clear()
        with audit_collectives("cpu", calls):
            dist.all_reduce(torch.ones(1))
        assert calls == [("all_reduce", ("cpu",))]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_collective_runs_on_the_training_device(spawned):
    """Training, checkpointing and resuming (which votes on checkpoint validity across ranks) on 2
    ranks: every tensor given to a torch.distributed collective is on the training device."""
    results, _ = spawned("audit ep2")
    for calls in results:
        names = {name for name, _ in calls}
        assert {"all_reduce", "all_to_all_single"} <= names, names    # the vote and the expert exchange ran
        assert all(set(types) <= {"cpu"} for _, types in calls)


@pytest.mark.slow
def test_bf16_fsdp_keeps_t_and_router_fp32_and_routes_like_one_process(spawned):
    """4 ranks tp2 x ep2 under FSDP2's bf16 policy: t reaches the timestep embedder in fp32, the
    router's weights, input and logits are fp32, every expert choice of the first forward equals
    the one-process bf16 run (dense FFN outputs start at zero in both, see bf16_run: bf16 tensor
    parallelism itself rounds the residual stream differently), and the losses stay within
    BF16_LOSS_RTOL of it."""
    got, ref = spawned("bf16 tp2-ep2")[0][0], spawned("bf16 1-rank")[0][0]
    assert got["t_dtype"] == ["torch.float32"]
    assert got["router"] == [("torch.float32", "torch.float32", "torch.float32")]
    assert got["router_param"] == ["torch.float32"]
    assert len(got["choices"]) == len(ref["choices"]) == 2
    for layer, (a, b) in enumerate(zip(got["choices"], ref["choices"])):
        assert a.shape == b.shape
        assert torch.equal(a, b), f"MoE layer {layer}: {(a != b).any(-1).sum().item()} (group, expert) choices differ"
    assert got["losses"] == pytest.approx(ref["losses"], rel=BF16_LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["1-rank", "ep2", "tp2-ep2"])
def test_meta_init_equals_full_init_bit_for_bit(layout, spawned):
    """Against one process with train.init=full (its own job, before this layout's)."""
    ref = spawned("init reference")[0][0]["full"]
    world = JOBS[f"init {layout}"][0]
    got = spawned(f"init {layout}")[0][0]
    assert got["meta"].keys() == ref.keys()
    for name, want in ref.items():
        assert torch.equal(got["meta"][name], want), f"meta init of {name} on {world} ranks"
        assert torch.equal(got["full"][name], want), f"full init of {name} on {world} ranks"
    # the experts are distinct (no two shards of a distributed tensor received the same values)
    w1 = ref["blocks.1.ffn.experts.w1"]
    assert not torch.equal(w1[0], w1[1])


@pytest.mark.slow
def test_sampling_during_training_uses_the_sharded_model(spawned):
    """The end-of-run grid of 2 ranks (ep2: every rank samples through the sharded model, EMA
    swapped in) shows the images one process draws (1 level of 255 for float reduction order)."""
    import numpy as np
    from PIL import Image

    one, two = spawned("sample 1-rank")[1], spawned("sample ep2")[1]
    name = "samples/step-00000002.png"
    a = np.asarray(Image.open(one / name), dtype=np.int16)
    b = np.asarray(Image.open(two / name), dtype=np.int16)
    assert a.shape == b.shape and a.std() > 0
    assert np.abs(a - b).max() <= 1


def test_host_sync_counter_sees_what_would_wait_for_a_gpu():
    """The counter of tests/host_sync.py catches value reads and value-sized outputs, and only those."""
    from host_sync import count_host_syncs

    x = torch.randn(6)
    with count_host_syncs() as syncs:
        y = (x * 2).softmax(0)
        torch.repeat_interleave(x, torch.full((6,), 2), output_size=12)    # sized by the caller: no wait
    assert syncs.count == 0, syncs.ops
    with count_host_syncs() as syncs:
        float(y.sum()), bool(y.max() > 0), y.tolist(), x[x > 0], torch.nonzero(x), x.int().abs().bincount()
    assert syncs.count == 6, syncs.ops


@pytest.mark.parametrize("layout", ["1-rank", pytest.param("ep2", marks=pytest.mark.slow)])
def test_one_host_read_per_expert_choice_step(layout, tmp_path, spawned):
    """Every expert-choice training step (gradient clipping and EMA on, the logging step with its
    routing statistics included) reads the device once: the step report's tolist()."""
    if layout == "1-rank":       # in this process: no start-up of a spawned rank
        per_step = [host_reads(0, 1, [], str(tmp_path / "run"), 3)]
    else:
        per_step = spawned(f"host reads {layout}")[0]
    for rank, steps in enumerate(per_step):
        assert steps == [["tolist"]] * 3, f"rank {rank}: {steps}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "tp2-ep2"])
def test_sampling_with_tensor_parallelism_uses_the_sharded_model(layout, spawned):
    """Every rank samples through the tp-sharded model (no full copy anywhere): guided and unguided
    latents of an odd batch equal a one-process model's with the same weights and seed (float
    reduction order only), and so does the trainer's sample grid (1 level of 255)."""
    import numpy as np
    from PIL import Image

    got = spawned(f"sharded samples {layout}")[0][0]
    for scale in (1.0, 4.0):
        a, b = got[f"sharded/{scale}"], got[f"one/{scale}"]
        assert a.shape == b.shape == (3, *a.shape[1:]) and b.std() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in got["grids"])
    assert a.shape == b.shape and a.std() > 0
    assert np.abs(a - b).max() <= 1


def test_step_report_sums_entries_in_one_read():
    """One process: entries come back as floats (zero where this rank does not contribute); NaN
    stays NaN; a name added twice is refused."""
    import math

    from ecdit_dist.step_report import StepReport
    from host_sync import count_host_syncs

    report = StepReport(torch.device("cpu"), distributed=False)
    report.add("flag", 1.0)
    report.add("loss", torch.tensor(2.5, dtype=torch.float64))
    report.add("norm", torch.tensor(3.0), contribute=False)
    report.add("bad", torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="'flag' added twice"):
        report.add("flag", 0.0)
    with count_host_syncs() as syncs:
        got = report.read()
    assert syncs.ops == ["tolist"]
    assert {k: v for k, v in got.items() if k != "bad"} == {"flag": 1.0, "loss": 2.5, "norm": 0.0}
    assert math.isnan(got["bad"])
