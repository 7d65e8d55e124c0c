"""Checkpoint conversions: export, import, merge, upcycle, inspect, DeepSpeed ZeRO.

Every conversion checks the tensors it reads against the model that the config describes
and fails naming missing, leftover and mis-shaped tensors before it writes anything.
An output folder is written as a staging folder beside it and renamed when complete; a
non-empty output folder is refused unless `overwrite`, which replaces it whole.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ecdit_dist.checkpoint import remote
from ecdit_dist.checkpoint.errors import CheckpointError
from ecdit_dist.checkpoint.manager import (
    CheckpointManager, _fsync_dir, _safe_member, read_meta, sha256_file, verify_checkpoint,
)
from ecdit_dist.checkpoint.streaming import DEFAULT_WORKERS, Staging, write_shards
from ecdit_dist.checkpoint.tensors import (
    ConvertError, DCPSource, TensorInfo, check_keys, expected_tensors, parse_size,
    total_bytes, write_safetensors,
)
from ecdit_dist.checkpoint.tensors import open_source as _open_local

CONFIG_JSON = "config.json"
FORMAT = "ecdit-dist/consolidated-v1"


class Progress(Protocol):
    """A byte counter such as a tqdm bar: the operation sets `total` once it knows it."""
    total: float | None

    def update(self, n: int) -> Any: ...

    def refresh(self) -> Any: ...


def _ticker(progress: Progress | None, total: int) -> Callable[[int], Any] | None:
    if progress is None:
        return remote.paced(None)      # paced: an S3 output holds the writer back while shards await upload
    progress.total = total
    progress.refresh()
    return remote.paced(progress.update)


def open_source(path: str | Path, ema: bool = False, verify: bool = True):
    """A checkpoint source on disk (tensors.open_source) or on S3 (checkpoint/remote.py)."""
    if remote.is_s3(str(path)):
        return remote.open_source(str(path), ema=ema, verify=verify)
    return _open_local(path, ema=ema, verify=verify)


def _arch(config: dict[str, Any]) -> tuple[dict, dict]:
    try:
        return dict(config["model"]), dict(config.get("moe", {}))
    except (KeyError, TypeError):
        raise ConvertError("the config has no 'model' section") from None


def source_config(path: Path, src) -> dict[str, Any]:
    """The architecture of a source: meta.json of a training checkpoint or config.json next to safetensors."""
    if hasattr(src, "read_config"):          # sources on S3 carry their config
        model, moe = _arch(src.read_config())
        return {"model": model, "moe": moe}
    if isinstance(src, DCPSource):
        config = read_meta(src.folder)["config"]
    else:
        folder = path if path.is_dir() else path.parent
        cfg_path = folder / CONFIG_JSON
        if not cfg_path.exists():
            raise ConvertError(f"{cfg_path} not found: consolidated weights need their config.json")
        config = json.loads(cfg_path.read_text())
    model, moe = _arch(config)
    return {"model": model, "moe": moe}


def _write_config(out: Path, config: dict[str, Any], extra: dict[str, Any]) -> None:
    body = {"format": FORMAT, "model": config["model"], "moe": config["moe"], **extra}
    tmp = out / f".{CONFIG_JSON}.tmp"
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, out / CONFIG_JSON)


def check_out(out: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that exists and is not empty, unless it is to be replaced whole."""
    if remote.is_s3(str(out)):
        return remote.check_out(str(out), overwrite)
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} exists and is not empty; choose another --out, or pass --overwrite to "
                           f"replace it whole")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove the staging (and half-replaced) folders of `out` left by processes of this host that
    are no longer running (a killed conversion); a live conversion's folder is left alone."""
    removed = []
    host = socket.gethostname()
    for kind in ("staging", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            owner = p.name[len(f".{out.name}.{kind}-"):]
            h, _, pid = owner.rpartition("-")
            if h == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False):
    """Yield a staging folder beside `out`; when the body completes it becomes `out` by a rename
    (an existing `out` is replaced whole, never file by file). A crash or an error leaves `out` as
    it was; the staging folder is removed on errors and ignored by readers (its name starts with
    '.'); the staging folders of killed conversions of the same `out` on this host are removed.
    An s3:// `out` is staged locally a few shards at a time and committed by its config.json
    (checkpoint/remote.py)."""
    if remote.is_s3(str(out)):
        with remote.staged_upload(str(out), overwrite) as stage:
            yield stage
        return
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    stage = out.parent / f".{out.name}.staging-{owner}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{owner}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)
    _fsync_dir(out.parent)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _out_infos(infos: dict[str, TensorInfo], dtype: torch.dtype | None) -> dict[str, TensorInfo]:
    return {k: TensorInfo(v.shape, dtype if dtype is not None and v.dtype.is_floating_point else v.dtype)
            for k, v in infos.items()}


# ------------------------------------------------------------------------------------ verification
VERIFY_MODES = ("sha256", "size")


class DamagedInput(CheckpointError):
    """An input file does not match its manifest."""


class _Verifier:
    """Checks a checkpoint folder against its manifest: sizes at once; with "sha256" the digests in
    background threads while the conversion reads, joined by `wait()` before the output is committed
    (so a damaged input never yields an output, and hashing overlaps the copy)."""

    def __init__(self, folder: Path, mode: str, threads: int = 2) -> None:
        if mode not in VERIFY_MODES:
            raise ConvertError(f"--verify {mode!r}: choose one of {', '.join(VERIFY_MODES)}")
        self.folder = folder
        manifest = verify_checkpoint(folder, full=False)         # sizes and presence, now
        self.pool = None
        self.futures = []
        if mode == "sha256" and manifest["files"]:
            entries = sorted(manifest["files"].items(), key=lambda kv: -int(kv[1].get("size") or 0))
            self.pool = ThreadPoolExecutor(max(1, min(threads, len(entries))), thread_name_prefix="verify")
            self.futures = [self.pool.submit(self._check, name, entry) for name, entry in entries]

    def _check(self, name: str, entry: dict) -> None:
        if sha256_file(_safe_member(self.folder, name)) != entry.get("sha256"):
            raise DamagedInput(f"{self.folder}: {name} does not match its sha256 in the manifest")

    def wait(self) -> None:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _training_folder(path: Path) -> tuple[Path, bool] | None:
    """(step folder, given as a run folder) for a training checkpoint, checked by size; None when
    `path` is not one."""
    if (path / "manifest.json").exists() or (path / ".metadata").exists():
        return path, False
    if (path / "checkpoints").is_dir():
        found = CheckpointManager(path).latest_valid(full_verify=False)
        if found is None:
            raise CheckpointError(f"no valid checkpoint under {path} (expected {path}/checkpoints/step-*/)")
        return found, True
    return None


class _Verified:
    """The verifier of a source that verified itself when opened (an S3 checkpoint, remote.py)."""

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


def _open_training(path: str | Path, ema: bool, verify: str, threads: int) -> tuple[DCPSource, Any]:
    if remote.is_s3(str(path)):
        if verify not in VERIFY_MODES:
            raise ConvertError(f"--verify {verify!r}: choose one of {', '.join(VERIFY_MODES)}")
        src = remote.open_source(str(path), ema=ema, verify=verify == "sha256")
        if not isinstance(src, DCPSource):
            raise ConvertError(f"{path} is not a training checkpoint (no manifest.json / .metadata under it)")
        return src, _Verified()
    found = _training_folder(Path(path))
    if found is None:
        raise ConvertError(f"{path} is not a training checkpoint (no .metadata / checkpoints/)")
    verifier = _Verifier(found[0], verify, threads)
    try:
        return DCPSource(found[0], "ema" if ema else "model", verify=False), verifier
    except BaseException:
        verifier.close()
        raise


def _with_fallback(path: str | Path, verify: str, run: Callable[[str | Path, str], dict]) -> dict:
    """Run a conversion of `path`; when `path` is a run folder whose newest checkpoint turns out
    damaged (sha256), run it again on the newest one that verifies in full, as resuming would."""
    try:
        return run(path, verify)
    except DamagedInput as e:
        found = _training_folder(Path(path))
        if found is None or not found[1]:
            raise
        from ecdit_dist.inference import resolve_checkpoint

        import warnings

        warnings.warn(f"{e}; using the newest checkpoint of {path} that verifies", stacklevel=2)
        return run(resolve_checkpoint(path, True), "size")


# ------------------------------------------------------------------------------------ export
def export(checkpoint: str | Path, out: str | Path, max_shard_size: str = "5GB", dtype: torch.dtype | None = None,
           ema: bool = False, dry_run: bool = False, progress: Progress | None = None,
           overwrite: bool = False, verify: str = "sha256", workers: int = DEFAULT_WORKERS,
           on_shard: Callable[[Path, Any], Any] | None = None) -> dict[str, Any]:
    """Training checkpoint -> consolidated safetensors + config.json, streamed.

    The tensors' bytes are read straight from the `.distcp` files (dcp_raw.py): tensors whose
    bytes need no conversion (no --dtype cast, every chunk a block of whole rows) are copied file
    to file by `copy_file_range`; others are assembled and cast in `DEFAULT_BUFFERS` reused staging
    buffers. `workers` threads write the shards in parallel at their offsets. Peak memory: at
    most DEFAULT_BUFFERS x (largest tensor + its cast) plus the chunk being placed, whatever the
    model size. `verify`: "sha256" (default, for inputs from elsewhere) hashes every file of the
    checkpoint against its manifest while the export runs, and nothing is committed unless all
    match; "size" (trusted inputs, e.g. a checkpoint this cluster wrote) checks sizes only.
    `on_shard(path, shard)` is called for each finished shard file in order (see streaming.py).
    """
    check_out(out, overwrite)

    def run(path, mode):
        return _export(path, out, max_shard_size, dtype, ema, dry_run, progress, overwrite, mode, workers, on_shard)

    return _with_fallback(checkpoint, verify, run)


def _export(checkpoint, out, max_shard_size, dtype, ema, dry_run, progress, overwrite, verify, workers, on_shard):
    src, verifier = _open_training(checkpoint, ema, verify if not dry_run else "size", workers)
    try:
        config = source_config(Path(checkpoint), src)
        check_keys(src.infos, expected_tensors(config["model"], config["moe"]), src.describe())
        infos = _out_infos(src.infos, dtype)
        plan = {"source": src.describe(), "tensors": len(infos), "bytes": total_bytes(infos.values()),
                "max_shard_bytes": parse_size(max_shard_size), "out": str(out), "verify": verify}
        if dry_run:
            return plan

        def read(name: str, staging: Staging) -> torch.Tensor:
            t = src.read_into(name, staging.buffer("in", src.infos[name]))
            if infos[name].dtype == t.dtype:
                return t
            return staging.buffer("out", infos[name]).copy_(t)

        def extents(name: str):
            return src.extents(name) if infos[name].dtype == src.infos[name].dtype else None

        with staged_output(out, overwrite) as stage:
            shards = write_shards(stage, infos, read, plan["max_shard_bytes"], {"format": "pt", "source": FORMAT},
                                  _ticker(progress, plan["bytes"]), extents=extents, workers=workers,
                                  shard_gate=remote.shard_gate(), on_shard=on_shard)
            _write_config(stage, config, {"weights": "ema" if ema else "model",
                                          "step": read_meta(src.folder).get("step")})
            verifier.wait()
        return {**plan, "files": [s.file for s in shards]}
    finally:
        verifier.close()


# ------------------------------------------------------------------------------------ import
def import_(src_path: str | Path, run_dir: str | Path, dry_run: bool = False,
            progress: Progress | None = None, group_size: str = "64MiB") -> dict[str, Any]:
    """Consolidated safetensors + config.json -> a weights-only training checkpoint at step 0 in
    `run_dir`; training with that run.dir (any layout) starts from these weights with a fresh
    optimizer. Streams: tensors are read and written in groups of at most `group_size` (a larger
    tensor alone), so memory is bounded by the largest tensor or group, not the model
    (see checkpoint/stream_import.py)."""
    from ecdit_dist.checkpoint.stream_import import write_weights_checkpoint

    if remote.is_s3(str(run_dir)):        # written locally, then uploaded in the mirror's layout
        return remote.import_to_s3(str(run_dir), dry_run,
                                   lambda local, dry: import_(src_path, local, dry, progress, group_size))
    src = remote.open_safetensors(src_path)
    config = source_config(Path(src_path), src)
    expected = expected_tensors(config["model"], config["moe"])
    check_keys(src.infos, expected, src.describe())
    infos = {k: src.infos[k] for k in expected}        # the model's order, as a training save has it
    group_bytes = parse_size(group_size)
    plan = {"source": src.describe(), "tensors": len(src.infos), "bytes": total_bytes(src.infos.values()),
            "group_bytes": group_bytes, "largest_tensor_bytes": max(i.nbytes for i in src.infos.values()),
            "out": str(Path(run_dir) / "checkpoints" / "step-00000000")}
    if dry_run:
        return plan
    meta = {"config": config, "contents": ["ema", "model", "trainer"], "trainer_keys": ["step"],
            "imported_from": str(src_path)}
    write_weights_checkpoint(run_dir, infos, src.load, meta, group_bytes or 1, _ticker(progress, plan["bytes"]))
    return plan


# ------------------------------------------------------------------------------------ merge
_BLOCK = 1 << 20          # elements per float64 scratch block of the weighted sum (8 MiB)


def merge(inputs: list[str | Path], out: str | Path, weights: list[float] | None = None,
          tensor_weights: dict[str, list[float]] | None = None, max_shard_size: str = "5GB",
          dtype: torch.dtype | None = None, ema: bool = False, dry_run: bool = False,
          progress: Progress | None = None, overwrite: bool = False, verify: str = "sha256",
          workers: int = DEFAULT_WORKERS, on_shard: Callable[[Path, Any], Any] | None = None) -> dict[str, Any]:
    """Weighted average of checkpoints (default: equal weights), streamed tensor by tensor.

    Inputs are training checkpoints (DCP, saved on any number of ranks and any layout: every
    tensor is assembled from its chunks in memory, nothing is consolidated on disk first) or
    consolidated safetensors. `tensor_weights` maps glob patterns of tensor names to per-input
    weights (first match wins). With one input this re-shards (e.g. joins shards into one file:
    max_shard_size 0), copying bytes file to file. Sums are float64: per staging buffer
    (DEFAULT_BUFFERS of them) one input tensor plus a float64 accumulator of the largest tensor
    and an 8 MiB scratch block. `verify` applies to training checkpoints as in `export`; a
    damaged input stops the merge (no fallback: name the step folder to merge another one).
    """
    if not inputs:
        raise ConvertError("merge needs at least one input")
    check_out(out, overwrite)
    verifiers: list[_Verifier] = []
    try:
        sources = []
        for p in inputs:
            if (remote.resolve_dcp(remote._storage(), str(p)) is not None if remote.is_s3(str(p))
                    else _training_folder(Path(p)) is not None):
                src, v = _open_training(p, ema, verify if not dry_run else "size", 2)
                verifiers.append(v)
                sources.append(src)
            else:
                sources.append(open_source(p, ema=ema))
        return _merge(inputs, sources, verifiers, out, weights, tensor_weights, max_shard_size, dtype, dry_run,
                      progress, overwrite, workers, on_shard)
    finally:
        for v in verifiers:
            v.close()


def _merge(inputs, sources, verifiers, out, weights, tensor_weights, max_shard_size, dtype, dry_run, progress,
           overwrite, workers, on_shard):
    configs = [source_config(Path(p), s) for p, s in zip(inputs, sources)]
    for p, c in zip(inputs[1:], configs[1:]):
        if c != configs[0]:
            raise ConvertError(f"{p} has another architecture than {inputs[0]}; only equal models can be merged")
    expected = expected_tensors(configs[0]["model"], configs[0]["moe"])
    for s in sources:
        check_keys(s.infos, expected, s.describe())
    n = len(sources)
    weights = list(weights) if weights is not None else [1.0 / n] * n
    if len(weights) != n:
        raise ConvertError(f"--weights has {len(weights)} values for {n} inputs")
    for pattern, ws in (tensor_weights or {}).items():
        if len(ws) != n:
            raise ConvertError(f"tensor weights for {pattern!r} have {len(ws)} values for {n} inputs")

    def weights_for(name: str) -> list[float]:
        for pattern, ws in (tensor_weights or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                return ws
        return weights

    infos = _out_infos(sources[0].infos, dtype)
    plan = {"inputs": [s.describe() for s in sources], "weights": weights, "tensors": len(infos),
            "bytes": total_bytes(infos.values()), "out": str(out)}
    if dry_run:
        return plan

    def read(name: str, st: Staging) -> torch.Tensor:
        ws = weights_for(name)
        info = sources[0].infos[name]
        if not info.dtype.is_floating_point:
            first = sources[0].read_into(name, st.buffer("acc", info))
            for s in sources[1:]:
                if not torch.equal(s.read_into(name, st.buffer("in", s.infos[name])), first):
                    raise ConvertError(f"{name} is not floating point and differs between inputs")
            return first
        if n == 1 and ws[0] == 1.0:
            t = sources[0].read_into(name, st.buffer("in", info))
            return t if infos[name].dtype == t.dtype else st.buffer("out", infos[name]).copy_(t)
        acc = st.buffer("acc", TensorInfo(info.shape, torch.float64)).view(-1)
        for i, (s, w) in enumerate(zip(sources, ws)):
            x = s.read_into(name, st.buffer("in", s.infos[name])).view(-1)
            for lo in range(0, x.numel(), _BLOCK):              # acc += float64(x) * w, block by block
                hi = min(lo + _BLOCK, x.numel())
                if i == 0:
                    acc[lo:hi].copy_(x[lo:hi]).mul_(w)
                else:
                    tmp = st.buffer("tmp", TensorInfo((hi - lo,), torch.float64))
                    acc[lo:hi].add_(tmp.copy_(x[lo:hi]).mul_(w))
        target = infos[name].dtype if dtype is not None else info.dtype
        return st.buffer("in", TensorInfo(info.shape, target)).copy_(acc.view(info.shape))

    def extents(name: str):
        if n != 1 or weights_for(name)[0] != 1.0 or infos[name].dtype != sources[0].infos[name].dtype:
            return None
        return sources[0].extents(name)

    with staged_output(out, overwrite) as stage:
        shards = write_shards(stage, infos, read, parse_size(max_shard_size), {"format": "pt", "source": FORMAT},
                              _ticker(progress, plan["bytes"]), extents=extents, workers=workers,
                              shard_gate=remote.shard_gate(), on_shard=on_shard)
        _write_config(stage, configs[0], {"merged_from": [str(p) for p in inputs], "merge_weights": weights})
        for v in verifiers:
            v.wait()
    return {**plan, "files": [s.file for s in shards]}


# ------------------------------------------------------------------------------------ upcycle
def _seed_for(seed: int, name: str) -> int:
    """A generator seed of its own per output tensor, so the result does not depend on the order
    (or the thread) in which tensors are produced."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def upcycle(src_path: str | Path, out: str | Path, num_experts: int, noise: float = 0.0, router_std: float = 0.02,
            seed: int = 0, capacity_factor: float | None = None, max_shard_size: str = "5GB",
            dry_run: bool = False, progress: Progress | None = None, overwrite: bool = False,
            workers: int = DEFAULT_WORKERS, on_shard: Callable[[Path, Any], Any] | None = None) -> dict[str, Any]:
    """Dense checkpoint -> EC-DiT with `num_experts` experts per MoE layer, streamed tensor by tensor.

    Every expert of a MoE layer starts as a copy of that layer's dense FFN (w1 (d_ff, d) ->
    experts.w1[e] (d, d_ff), w2 (d, d_ff) -> experts.w2[e] (d_ff, d)), optionally plus Gaussian
    noise of `noise` x the weight's standard deviation (drawn expert by expert); the router
    starts at N(0, router_std). Random draws come from a generator per output tensor seeded by
    (seed, name). With zero noise an upcycled layer returns, for each token, (sum of its gates) x
    the dense FFN output. Memory per staging buffer: one stacked expert tensor (the largest output)
    plus the dense weight and one expert's noise. Tensors copied unchanged go file to file.
    """
    if num_experts < 1:
        raise ConvertError("--experts must be >= 1")
    check_out(out, overwrite)
    src = open_source(src_path)
    config = source_config(Path(src_path), src)
    if config["moe"].get("num_experts", 0):
        raise ConvertError(f"{src_path} already has {config['moe']['num_experts']} experts; upcycle reads dense models")
    check_keys(src.infos, expected_tensors(config["model"], config["moe"]), src.describe())
    new_moe = {**config["moe"], "num_experts": num_experts, "router": "expert_choice"}
    if capacity_factor is not None:
        new_moe["capacity_factor"] = capacity_factor
    new_config = {"model": config["model"], "moe": new_moe}
    expected = expected_tensors(new_config["model"], new_moe)

    # every output tensor and the source tensor(s) it is made from
    recipe: dict[str, tuple[str, str]] = {}
    for name in expected:
        if name.endswith(".ffn.experts.w1"):
            recipe[name] = ("experts", name.replace(".ffn.experts.w1", ".ffn.w1.weight"))
        elif name.endswith(".ffn.experts.w2"):
            recipe[name] = ("experts", name.replace(".ffn.experts.w2", ".ffn.w2.weight"))
        elif name.endswith(".ffn.router.weight"):
            recipe[name] = ("router", "")
        else:
            recipe[name] = ("copy", name)
    used = {s for kind, s in recipe.values() if kind != "router"}
    leftover = sorted(set(src.infos) - used)
    missing = sorted(s for s in used if s not in src.infos)
    if leftover or missing:
        raise ConvertError(f"upcycle of {src.describe()}: unused source tensors {leftover[:8]}, missing {missing[:8]}")
    dtypes = {n: src.infos[s].dtype if kind != "router" else torch.float32 for n, (kind, s) in recipe.items()}
    infos = {n: TensorInfo(tuple(expected[n]), dtypes[n]) for n in expected}
    plan = {"source": src.describe(), "experts": num_experts, "tensors": len(infos),
            "bytes": total_bytes(infos.values()), "out": str(out)}
    if dry_run:
        return plan

    def read(name: str, st: Staging) -> torch.Tensor:
        kind, s = recipe[name]
        if kind == "copy":
            return src.read_into(s, st.buffer("in", src.infos[s]))
        gen = torch.Generator().manual_seed(_seed_for(seed, name))
        if kind == "router":
            return st.buffer("out", infos[name]).copy_(torch.randn(expected[name], generator=gen) * router_std)
        dense = src.read_into(s, st.buffer("in", src.infos[s])).t()      # (d, d_ff) or (d_ff, d)
        w = st.buffer("out", infos[name])                                 # (E, ., .)
        std = dense.float().std() if noise > 0 else None
        for e in range(num_experts):
            w[e].copy_(dense)
            if noise > 0:
                w[e].add_((torch.randn(dense.shape, generator=gen) * noise * std).to(w.dtype))
        return w

    def extents(name: str):
        kind, s = recipe[name]
        return src.extents(s) if kind == "copy" else None

    with staged_output(out, overwrite) as stage:
        shards = write_shards(stage, infos, read, parse_size(max_shard_size), {"format": "pt", "source": FORMAT},
                              _ticker(progress, plan["bytes"]), extents=extents, workers=workers,
                              shard_gate=remote.shard_gate(), on_shard=on_shard)
        _write_config(stage, new_config, {"upcycled_from": str(src_path), "upcycle_noise": noise})
    return {**plan, "files": [s.file for s in shards]}


def load_model(path: str | Path, dtype: torch.dtype | None = None):
    """Build the ECDiT of a consolidated folder (config.json + safetensors) and load its weights."""
    from ecdit_dist.config import config_from_dict
    from ecdit_dist.model import ECDiT

    src = remote.open_safetensors(path)
    config = source_config(Path(path), src)
    check_keys(src.infos, expected_tensors(config["model"], config["moe"]), src.describe())
    cfg = config_from_dict(config, validate=False)
    model = ECDiT(cfg.model, cfg.moe)
    if dtype is not None:
        model = model.to(dtype)
    model.load_state_dict({k: src.load(k) for k in src.infos})
    return model


# ------------------------------------------------------------------------------------ inspect
def inspect(path: str | Path, verify: bool = True, ema: bool = False) -> dict[str, Any]:
    """Tensors, shapes, dtypes and totals of a checkpoint; checksums verified for training checkpoints."""
    if remote.is_s3(str(path)):
        return remote.inspect(str(path), verify=verify, ema=ema)
    path = Path(path)
    src = open_source(path, ema=ema, verify=False)      # verified once, below, when asked
    report: dict[str, Any] = {"path": str(path), "kind": "training" if isinstance(src, DCPSource) else "safetensors"}
    if isinstance(src, DCPSource):
        if verify:
            manifest = verify_checkpoint(src.folder, full=True)
            report["verified_files"] = len(manifest["files"])
        meta = read_meta(src.folder)
        report["step"] = meta.get("step")
        report["layout"] = meta.get("layout")
    report["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                         for k, v in src.infos.items()}
    report["total_params"] = sum(math.prod(v.shape) for v in src.infos.values())
    report["total_bytes"] = total_bytes(src.infos.values())
    try:
        config = source_config(path, src)
        check_keys(src.infos, expected_tensors(config["model"], config["moe"]), src.describe())
        report["matches_config"] = True
    except ConvertError as e:
        report["matches_config"] = str(e)
    return report


# ------------------------------------------------------------------------------------ deepspeed
# Plain data types that DeepSpeed ZeRO checkpoint files hold besides tensors and containers
# (an enum, a dataclass and loss-scaler records without custom unpickling); anything else is refused.
DEEPSPEED_SAFE_GLOBALS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                          ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                          ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                          ("deepspeed.utils.tensor_fragment", "fragment_address"))


class _weights_only_torch_load:
    """deepspeed's zero_to_fp32 calls torch.load(weights_only=False); while it runs, torch.load reads
    with weights_only=True and admits only DEEPSPEED_SAFE_GLOBALS, so a checkpoint runs no code."""

    def __init__(self, source) -> None:
        self.source = source

    def __enter__(self):
        import importlib
        import pickle

        allowed = []
        for module, name in DEEPSPEED_SAFE_GLOBALS:
            try:
                allowed.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):
                pass
        self.real = real = torch.load
        source = self.source

        def load(f, *args, **kwargs):
            kwargs["weights_only"] = True
            with torch.serialization.safe_globals(allowed):
                try:
                    return real(f, *args, **kwargs)
                except pickle.UnpicklingError as e:
                    raise ConvertError(f"DeepSpeed checkpoint {source}: {f} holds objects that weights-only loading "
                                       f"refuses, so it is not read (no code from it runs): "
                                       f"{str(e).splitlines()[0]}") from None

        torch.load = load
        return self

    def __exit__(self, *exc) -> None:
        torch.load = self.real


def from_deepspeed(ds_dir: str | Path, out: str | Path, config_path: str | Path, tag: str | None = None,
                   max_shard_size: str = "5GB", dry_run: bool = False, progress: Progress | None = None,
                   overwrite: bool = False, *, _source: str | None = None) -> dict:
    """A DeepSpeed ZeRO (stage 1-3) checkpoint of an ECDiT without expert parallelism -> consolidated
    safetensors, through deepspeed's own zero_to_fp32 reader. (`_source`: the name recorded in
    config.json when `ds_dir` is a local copy of an S3 checkpoint.)"""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ConvertError("reading DeepSpeed checkpoints needs deepspeed (pip install 'ecdit-dist[deepspeed]')") from None
    if remote.is_s3(str(ds_dir)):          # DeepSpeed's reader needs files (and loads the whole model anyway)
        check_out(out, overwrite)
        with remote.local_copy(str(ds_dir)) as local:
            return {**from_deepspeed(local, out, config_path, tag, max_shard_size, dry_run, progress, overwrite,
                                     _source=str(ds_dir)), "source": str(ds_dir)}
    from ecdit_dist.config import load_config

    check_out(out, overwrite)
    cfg = load_config(config_path)
    config = {"model": cfg.to_dict()["model"], "moe": cfg.to_dict()["moe"]}
    with _weights_only_torch_load(ds_dir):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = expected_tensors(config["model"], config["moe"])
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}
    check_keys(infos, expected, f"DeepSpeed checkpoint {ds_dir}")
    plan = {"source": str(ds_dir), "tensors": len(infos), "bytes": total_bytes(infos.values()), "out": str(out)}
    if dry_run:
        return plan
    infos = {k: infos[k] for k in expected}
    with staged_output(out, overwrite) as stage:
        shards = write_safetensors(stage, infos, lambda n: state[n].contiguous(), parse_size(max_shard_size),
                                   {"format": "pt", "source": FORMAT}, _ticker(progress, plan["bytes"]))
        _write_config(stage, config, {"converted_from": f"deepspeed:{_source or ds_dir}"})
    return {**plan, "files": [s.file for s in shards]}


__all__ = ["ConvertError", "export", "import_", "merge", "upcycle", "inspect", "from_deepspeed"]
