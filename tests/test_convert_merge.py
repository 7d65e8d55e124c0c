"""Streaming export, merge and upcycle: multi-rank DCP inputs read in place, float64 references,
the bytes of the previous (dcp.load, sequential) export, bounded peak memory, killed merges,
and input verification."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ecdit_dist.checkpoint import convert as C
from ecdit_dist.checkpoint import safe_load
from ecdit_dist.checkpoint.manager import CheckpointManager
from ecdit_dist.checkpoint.tensors import (
    DCPSource, TensorInfo, expected_tensors, parse_size, write_safetensors,
)
from ecdit_dist.config import config_from_dict
from ecdit_dist.parallel.local import run_ranks
from workers import EQUIV, train_layout, write_synthetic_model

SYN_MODEL = {"preset": "tiny", "hidden_dim": 512, "num_layers": 12, "num_heads": 8, "num_kv_heads": 4}
SYN_MOE = {"num_experts": 4}

PROBE = """
import re, sys, json
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
import torch, safetensors.torch
import ecdit_dist.checkpoint.convert as C, ecdit_dist.model, ecdit_dist.config
C.expected_tensors({"preset": "tiny"}, {"num_experts": 2})      # model code loaded before the baseline
base = hwm()
op, args = sys.argv[1], json.loads(sys.argv[2])
getattr(C, op)(**args)
print(base, hwm())
"""


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ecdit_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def dcp_reference(folder: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint read by dcp.load (the reader the export used before)."""
    src = DCPSource(folder, prefix, verify=False)
    out = {}
    for name, info in src.infos.items():
        state = {f"{prefix}.{name}": torch.empty(info.shape, dtype=info.dtype)}
        safe_load.load(state, folder)
        out[name] = state[f"{prefix}.{name}"]
    return out


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def random_checkpoint(run: Path, step: int, seed: int, model=None, moe=None) -> dict[str, torch.Tensor]:
    """A committed one-process training checkpoint of random weights (no training needed)."""
    cfg = config_from_dict({"model": model or {"preset": "tiny"}, "moe": moe or {"num_experts": 4}}, validate=False)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(tuple(v), generator=gen) for k, v in expected_tensors(cfg.to_dict()["model"],
                                                                                 cfg.to_dict()["moe"]).items()}
    optim = {f"{k}.sq": torch.rand(v.shape, generator=gen) for k, v in state.items()}
    CheckpointManager(run, keep_last=10).save(step, {"model": state, "optim": optim,
                                                     "trainer": {"step": torch.tensor(step)}},
                                              {"config": cfg.to_dict(), "contents": ["model", "optim", "trainer"]})
    return state


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """A training checkpoint written by 2 ranks with tensor parallelism: tensors split by rows
    and by columns across two .distcp files."""
    work = tmp_path_factory.mktemp("tp2")
    run_ranks(train_layout, 2, work / "ranks", str(work / "run"), ["parallel.tp=2", *EQUIV], 1, timeout=300)
    ckpt = sorted((work / "run" / "checkpoints").glob("step-*"))[-1]
    assert len(list(ckpt.glob("*.distcp"))) == 2
    return work / "run", ckpt


# ----------------------------------------------------------------------------- export: bytes as before
def test_export_of_a_multi_rank_checkpoint_has_the_bytes_of_the_dcp_load_export(tp2_run, tmp_path):
    run, ckpt = tp2_run
    src = DCPSource(ckpt, verify=False)
    kinds = {src.extents(n) is not None for n in src.infos}
    assert kinds == {True, False}             # both row blocks (copied file to file) and column splits
    assert any(len(src.raw.chunks[n]) > 1 for n in src.infos)
    # the previous export: dcp.load of each tensor, written sequentially (same header, order, shards)
    ref = dcp_reference(ckpt)
    write_safetensors(tmp_path / "old", src.infos, lambda n: ref[n], parse_size("300KB"),
                      {"format": "pt", "source": C.FORMAT})
    done = []
    C.export(run, tmp_path / "new", max_shard_size="300KB", workers=3,
             on_shard=lambda path, shard: done.append((path.name, path.is_file())))
    old = sorted(p.name for p in (tmp_path / "old").iterdir())
    assert len(old) > 5 and old == sorted(p.name for p in (tmp_path / "new").iterdir() if p.name != "config.json")
    for name in old:
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes(), name
    shards = sorted(n for n in old if n.endswith(".safetensors"))
    assert done == [(n, True) for n in shards]             # each finished shard reported once, in order
    C.export(run, tmp_path / "one", max_shard_size="300KB", workers=1, verify="size")
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "old" / n).read_bytes() for n in old)
    C.export(run, tmp_path / "bf16", max_shard_size="0", dtype=torch.bfloat16)
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in ref.items())


# ----------------------------------------------------------------------------- merge: float64 reference
def test_merge_of_multi_rank_one_rank_and_consolidated_inputs_equals_float64_average(tp2_run, tmp_path):
    run, ckpt = tp2_run
    a = dcp_reference(ckpt)
    cfg = json.loads((ckpt / "meta.json").read_text())["config"]
    b = random_checkpoint(tmp_path / "b", 7, seed=int.from_bytes(os.urandom(4), "little"),
                          model=cfg["model"], moe=cfg["moe"])
    c = {k: torch.randn_like(v) for k, v in a.items()}
    (tmp_path / "c").mkdir()
    save_file(c, tmp_path / "c" / "model.safetensors")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"model": cfg["model"], "moe": cfg["moe"]}))
    weights = [0.2, 0.3, 0.5]
    C.merge([run, tmp_path / "b", tmp_path / "c"], tmp_path / "m", weights=weights, max_shard_size="200KB",
            workers=3)
    got = read_folder(tmp_path / "m")
    assert got.keys() == a.keys()
    for name in a:
        want = a[name].double() * weights[0]
        want = want + b[name].double() * weights[1]
        want = want + c[name].double() * weights[2]
        assert torch.equal(got[name], want.float()), name
    # one input re-sharded into one file: the same tensors, copied file to file
    C.merge([run], tmp_path / "joined", max_shard_size="0")
    joined = load_file(tmp_path / "joined" / "model.safetensors")
    assert all(torch.equal(joined[k], a[k]) for k in a)


# ----------------------------------------------------------------------------- verification
def test_verify_sha256_overlaps_and_refuses_damage_size_trusts(tmp_path):
    run = tmp_path / "run"
    older = random_checkpoint(run, 1, seed=1)
    newer = random_checkpoint(run, 2, seed=2)
    step2 = run / "checkpoints" / "step-00000002"
    md = safe_load.read_metadata(step2)
    # flip one byte of the optimizer state (never read by the export): only sha256 sees it
    from torch.distributed.checkpoint.metadata import MetadataIndex
    info = md.storage_data[next(k for k in md.storage_data if isinstance(k, MetadataIndex) and k.fqn.startswith("optim."))]
    f = step2 / info.relative_path
    with open(f, "r+b") as fh:
        fh.seek(info.offset + info.length - 3)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(C.DamagedInput, match="does not match its sha256"):
        C.export(step2, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    C.export(run, tmp_path / "fallback", max_shard_size="0")           # a run folder: the newest that verifies
    got = load_file(tmp_path / "fallback" / "model.safetensors")
    assert all(torch.equal(got[k], older[k]) for k in older)
    r = cli("convert", "export", "--checkpoint", step2, "--out", tmp_path / "trusted", "--verify", "size",
            "--max-shard-size", "0", "--workers", "2")
    assert r.returncode == 0, r.stderr
    got = load_file(tmp_path / "trusted" / "model.safetensors")
    assert all(torch.equal(got[k], newer[k]) for k in newer)
    with pytest.raises(C.DamagedInput):
        C.merge([step2, run], tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- memory and killed merges
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A consolidated model of ~343 MiB in 281 tensors (the largest 16 MiB), written tensor by tensor."""
    folder = tmp_path_factory.mktemp("synthetic")
    return folder, write_synthetic_model(folder, SYN_MODEL, SYN_MOE, 4321)


def _peak(op: str, **kwargs) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, op, json.dumps(kwargs)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    base, peak = map(int, out.stdout.split()[-2:])
    return peak - base


def test_merge_peak_memory_is_bounded_by_the_largest_tensor(synthetic, tmp_path):
    src, infos = synthetic
    largest = max(i.nbytes for i in infos.values())
    model_bytes = sum(i.nbytes for i in infos.values())
    # per staging buffer (2): the input tensor, a float64 accumulator, 8 MiB of float64 scratch; plus
    # 128 MiB for the worker threads' allocator arenas and the rest of the process
    bound = 2 * (largest + 2 * largest + (8 << 20)) + (128 << 20)
    assert model_bytes > bound and 3 * model_bytes > 4 * bound      # holding the inputs would exceed it
    grown = _peak("merge", inputs=[str(src)] * 3, out=str(tmp_path / "m"), weights=[0.5, 0.25, 0.25],
                  max_shard_size="100MB")
    assert largest < grown <= bound, f"merge: {grown / 2**20:.0f} MiB above idle, bound {bound / 2**20:.0f} MiB"
    name = max(infos, key=lambda n: infos[n].nbytes)
    shard = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(src / "model.safetensors"), framework="pt") as a, \
            safe_open(str(tmp_path / "m" / shard), framework="pt") as b:
        assert torch.equal(b.get_tensor(name), a.get_tensor(name))      # 0.5 + 0.25 + 0.25 of the same


def test_upcycle_peak_memory_is_bounded_by_the_largest_output_tensor(tmp_path):
    dense_model = {"preset": "tiny-dense", "hidden_dim": 512, "num_layers": 12, "num_heads": 8, "num_kv_heads": 4}
    dense_moe = {"num_experts": 0}
    infos = {k: TensorInfo(tuple(v), torch.float32) for k, v in expected_tensors(dense_model, dense_moe).items()}
    gen = torch.Generator().manual_seed(5)
    (tmp_path / "dense").mkdir()
    write_safetensors(tmp_path / "dense", infos, lambda n: torch.randn(infos[n].shape, generator=gen), 0)
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model": dense_model, "moe": dense_moe}))
    experts = 8
    plan = C.upcycle(tmp_path / "dense", tmp_path / "dry", experts, dry_run=True)
    dense_largest = max(i.nbytes for i in infos.values())
    largest_out = experts * dense_largest
    # per staging buffer (2): the stacked experts, the dense weight, one expert's noise and its scaled copy;
    # plus 128 MiB for the worker threads' allocator arenas and the rest of the process
    bound = 2 * (largest_out + 3 * dense_largest) + (128 << 20)
    assert plan["bytes"] > 2 * bound, (plan["bytes"], bound)
    grown = _peak("upcycle", src_path=str(tmp_path / "dense"), out=str(tmp_path / "up"), num_experts=experts,
                  noise=0.01, max_shard_size="200MB")
    assert largest_out < grown <= bound, f"upcycle: {grown / 2**20:.0f} MiB above idle, bound {bound / 2**20:.0f} MiB"


def test_killed_merge_leaves_no_output_and_the_next_merge_cleans_up(synthetic, tmp_path):
    src, infos = synthetic
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-m", "ecdit_dist.cli", "convert", "merge", str(src), str(src),
                             "--out", str(out), "--max-shard-size", "20MB", "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "merge.err", "w"))
    deadline = time.monotonic() + 300
    try:
        while len([p for s in tmp_path.glob(".merged.staging-*") for p in s.glob("model-*.safetensors")]) < 2:
            assert proc.poll() is None, "the merge finished before it could be killed"
            assert time.monotonic() < deadline, "the merge wrote nothing"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()                                      # nothing a later command would read
    stale = list(tmp_path.glob(".merged.staging-*"))
    assert len(stale) == 1 and stale[0].name.endswith(f"-{proc.pid}")
    r = cli("convert", "merge", src, "--out", out, "--max-shard-size", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".merged.*"))                  # the dead process's staging folder is gone
    name = max(infos, key=lambda n: infos[n].nbytes)
    with safe_open(str(src / "model.safetensors"), framework="pt") as a, \
            safe_open(str(out / "model.safetensors"), framework="pt") as b:
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    shutil.rmtree(out)
