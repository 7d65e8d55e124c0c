"""Streaming import: consolidated safetensors -> a step-0 training checkpoint, a bounded group at a time.

DCP writes a whole state per `dcp.save`, so the import saves the model in groups instead:
the tensors are taken in file order into groups of at most `group_bytes` (a tensor larger than
that is a group of its own), each group is written by one `dcp.save` into a scratch folder
inside the checkpoint's staging folder, its data file is moved up under a name of its own, and
the group's DCP metadata is kept. When every group is written, the metadata of all groups is
joined into one `.metadata` (same DCP classes, storage paths rewritten to the moved files) and
the folder is committed like any training save (meta.json, manifest, rename, `latest`).
The result is an ordinary DCP checkpoint: training resumes from it on any layout and the
converters read it.

Memory: one group is alive at a time: its tensors as stored, plus an fp32 copy for the EMA
where the stored dtype is not fp32 (an fp32 tensor is shared, not copied), plus the mapped
source pages while a tensor is copied out. Stated bound on the peak above the idle process,
with G = max(largest tensor, group_bytes): 2 G + 64 MiB for fp32 inputs, 4 G + 64 MiB for
bf16/fp16 ones, whatever the model size (docs/PERFORMANCE.md has the measurements).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ecdit_dist.checkpoint.manager import CheckpointError, CheckpointManager, _fsync_dir, step_dir_name
from ecdit_dist.checkpoint.tensors import TensorInfo

DEFAULT_GROUP_BYTES = 64 << 20
RANK0 = "__0_"     # data files are named for rank 0, which hashes and uploads them (manager.owner_rank)


def groups(infos: dict[str, TensorInfo], group_bytes: int) -> Iterator[list[str]]:
    """Tensor names in order, in groups of at most `group_bytes` (one larger tensor alone)."""
    group: list[str] = []
    size = 0
    for name, info in infos.items():
        if group and size + info.nbytes > group_bytes:
            yield group
            group, size = [], 0
        group.append(name)
        size += info.nbytes
    if group:
        yield group


def _save_part(state: dict[str, Any], part: Path, target: Path, index: int):
    """dcp.save `state` into the scratch folder `part`; move its data files into `target` under
    names of their own; return the part's metadata with storage paths pointing at them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from ecdit_dist.checkpoint import safe_load

    part.mkdir()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, storage_writer=FileSystemWriter(str(part)))
    md = safe_load.read_metadata(part, signed=False)      # written just above by this process
    renamed: dict[str, str] = {}
    for f in sorted(p.name for p in part.iterdir() if p.name != ".metadata"):
        renamed[f] = f"{RANK0}p{index:06d}-{f}"
        os.replace(part / f, target / renamed[f])
    md.storage_data = {k: dataclasses.replace(v, relative_path=renamed[v.relative_path])
                       for k, v in md.storage_data.items()}
    shutil.rmtree(part)
    return md


def write_weights_checkpoint(run_dir: str | Path, infos: dict[str, TensorInfo], load: Callable[[str], torch.Tensor],
                             meta: dict[str, Any], group_bytes: int = DEFAULT_GROUP_BYTES,
                             tick: Callable[[int], Any] | None = None) -> Path:
    """Write a committed step-0 checkpoint {model, ema (fp32), trainer.step} into `run_dir`,
    loading tensors with `load(name)` one group at a time. A crash leaves only the hidden
    staging folder `.tmp-step-00000000`, which readers ignore and the next save removes."""
    mgr = CheckpointManager(run_dir)
    if mgr.dist.world != 1:
        raise CheckpointError("the streaming import runs on one process; run it outside torchrun")
    final = mgr.root / step_dir_name(0)
    tmp = mgr.root / f".tmp-{step_dir_name(0)}"
    mgr.root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    parts = []
    names = list(infos)
    batches = list(groups(infos, max(group_bytes, 1)))
    for i, batch in enumerate(batches):
        model = {n: load(n) for n in batch}
        state: dict[str, Any] = {"model": model, "ema": {n: t.float() for n, t in model.items()}}
        if i == len(batches) - 1:
            state["trainer"] = {"step": torch.tensor(0)}
        parts.append(_save_part(state, tmp / f".part-{i:06d}", tmp, i))
        if tick:
            tick(sum(infos[n].nbytes for n in batch))
        del model, state
    merged = parts[0]
    for md in parts[1:]:
        merged.state_dict_metadata.update(md.state_dict_metadata)
        merged.storage_data.update(md.storage_data)
        if isinstance(merged.planner_data, dict) and isinstance(md.planner_data, dict):
            merged.planner_data.update(md.planner_data)
    want = {f"{p}.{n}" for p in ("model", "ema") for n in names} | {"trainer.step"}
    if set(merged.state_dict_metadata) != want:      # a guard on the join itself, not on the input
        raise CheckpointError(f"joining the DCP metadata of {tmp} lost tensors: "
                              f"{sorted(want ^ set(merged.state_dict_metadata))[:5]}")
    with open(tmp / ".metadata.tmp", "wb") as f:
        pickle.dump(merged, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp / ".metadata.tmp", tmp / ".metadata")
    _fsync_dir(tmp)
    meta = {**meta, "run_id": mgr.ensure_run_id()}
    mgr._commit(mgr.dist, 0, meta, tmp, final)       # the same commit as a training save
    return final
