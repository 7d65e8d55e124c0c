"""Training checkpoints: written under a temporary name, committed by a manifest and a rename.

Layout of `<run.dir>/checkpoints/`:

    step-00000042/        a committed checkpoint
        .metadata, *.distcp   torch.distributed.checkpoint (DCP) files, any layout
        meta.json             step, resolved config, data position, layout it was saved on
        manifest.json         every other file with its size and sha256; written last
    latest                the name of the newest committed checkpoint (moved only after commit)
    .tmp-step-00000050/   a checkpoint being written; never loaded

A checkpoint without a manifest, or whose files differ from it, is skipped on resume
with a warning that names it. Retention keeps the newest `keep_last` and every
`keep_every`-th step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or unsafe."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(folder: Path) -> dict[str, Any]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": 1, "files": files}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _safe_member(folder: Path, name: str) -> Path:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        raise CheckpointError(f"{folder}: manifest entry {name!r} is not a relative path")
    target = (folder / name).resolve()
    root = folder.resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(f"{folder}: manifest entry {name!r} points outside the checkpoint folder")
    return target


def verify_checkpoint(folder: Path, full: bool = True) -> dict[str, Any]:
    """Check a committed checkpoint against its manifest; raise CheckpointError naming the problem."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except Exception:
        raise CheckpointError(f"{folder}: {MANIFEST} is unreadable") from None
    for name, entry in files.items():
        path = _safe_member(folder, name)
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{folder}: {name} has {size} bytes, manifest says {entry.get('size')}")
        if full and sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest")
    if ".metadata" not in files or META not in files:
        raise CheckpointError(f"{folder}: manifest lists no DCP .metadata or {META}")
    return manifest


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META).read_text())


@dataclass
class Dist:
    """The few collective operations the manager needs; the defaults are one process."""
    rank: int = 0
    barrier: Callable[[], None] = lambda: None
    all_ok: Callable[[bool], bool] = lambda ok: ok   # True on every rank iff ok on every rank


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 3, keep_every: int = 0, dist: Dist | None = None,
                 mirror: str | None = None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.dist = dist or Dist()
        self.mirror = mirror.rstrip("/") + "/checkpoints" if mirror else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], async_save: bool = False) -> Path:
        """Collective: every rank passes its state; rank 0 commits. Returns the (future) committed folder.

        With `async_save` the call returns once the state is copied to host memory; the files are
        written and committed in the background, and the next save (or `wait()`) waits for that.
        """
        import torch.distributed.checkpoint as dcp

        self.wait()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.dist.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.dist.barrier()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            if not async_save:
                dcp.save(state, checkpoint_id=str(tmp))
            else:
                future = dcp.async_save(state, checkpoint_id=str(tmp))
        if not async_save:
            self.dist.barrier()
            if self.dist.rank == 0:
                self._commit(step, meta, tmp, final)
            self.dist.barrier()
            return final

        def finish() -> None:   # background: the write completes, then rank 0 commits
            try:
                future.result()
                if self.dist.rank == 0:
                    self._commit(step, meta, tmp, final)
            except BaseException as e:  # reported by wait()
                self._error = e

        self._error: BaseException | None = None
        self._pending = threading.Thread(target=finish, name=f"checkpoint-{step}", daemon=False)
        self._pending.start()
        return final

    def wait(self) -> None:
        """Block until a background save has been written and committed (collective)."""
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        pending.join()
        self._pending = None
        self.dist.barrier()
        if self._error is not None:
            raise CheckpointError(f"background checkpoint save failed: {self._error}") from self._error

    def _commit(self, step: int, meta: dict[str, Any], tmp: Path, final: Path) -> None:
        atomic_write_text(tmp / META, json.dumps({**meta, "step": step}, indent=1, sort_keys=True))
        write_manifest(tmp)
        if final.exists():       # re-saving a step (e.g. after a resume): keep the newer copy
            old = self.root / f".old-{step_dir_name(step)}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / "latest", final.name + "\n")
        self._retain()
        if self.mirror:
            self._upload(final)

    def _retain(self) -> None:
        steps = sorted(self.committed_steps())
        keep = set(steps[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.root / step_dir_name(s), ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ object-storage mirror
    def _upload(self, folder: Path) -> None:
        """Copy a committed checkpoint to the mirror: data files, then the manifest, then `latest`;
        each object is checked (size and sha256) before the next step; stale steps are removed."""
        from ecdit_dist.data.storage import S3Storage

        s3 = S3Storage()
        manifest = json.loads((folder / MANIFEST).read_text())
        remote = f"{self.mirror}/{folder.name}"
        for name, entry in manifest["files"].items():
            s3.put_file(folder / name, f"{remote}/{name}", entry["sha256"])
            head = s3.head(f"{remote}/{name}")
            if head["ContentLength"] != entry["size"] or head.get("Metadata", {}).get("sha256") != entry["sha256"]:
                raise CheckpointError(f"mirror upload of {folder / name} to {remote}/{name} did not verify")
        s3.put_file(folder / MANIFEST, f"{remote}/{MANIFEST}")
        s3.put_bytes(f"{self.mirror}/latest", (folder.name + "\n").encode())
        keep = {step_dir_name(s) for s in self.committed_steps()}
        for obj in s3.list(self.mirror + "/"):
            step_dir = obj.path[len(self.mirror) + 1:].split("/", 1)[0]
            if STEP_DIR.match(step_dir) and step_dir not in keep:
                s3.delete(obj.path)

    def fetch_from_mirror(self, full_verify: bool = True) -> Path | None:
        """Rank 0: download the newest mirrored checkpoint whose manifest verifies into run.dir."""
        from ecdit_dist.data.storage import DataError, S3Storage

        s3 = S3Storage()
        names = sorted({o.path[len(self.mirror) + 1:].split("/", 1)[0] for o in s3.list(self.mirror + "/")},
                       reverse=True)
        for name in (n for n in names if STEP_DIR.match(n)):
            remote = f"{self.mirror}/{name}"
            tmp = self.root / f".fetch-{name}"
            try:
                manifest = json.loads(s3.read_bytes(f"{remote}/{MANIFEST}"))
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for file in manifest["files"]:
                    target = _safe_member(tmp, file)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.get_file(f"{remote}/{file}", target)
                (tmp / MANIFEST).write_text(json.dumps(manifest))
                verify_checkpoint(tmp, full=full_verify)
            except (DataError, CheckpointError, ValueError, KeyError) as e:
                warnings.warn(f"skipping mirrored checkpoint {remote}: {e}", stacklevel=2)
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", name + "\n")
            return final
        return None

    # ------------------------------------------------------------------ find / load
    def committed_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return [int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]

    def latest_valid(self, full_verify: bool = True) -> Path | None:
        """The newest checkpoint that passes verification; broken ones are reported and skipped."""
        for step in sorted(self.committed_steps(), reverse=True):
            folder = self.root / step_dir_name(step)
            ok, reason = True, ""
            if self.dist.rank == 0:
                try:
                    verify_checkpoint(folder, full=full_verify)
                except CheckpointError as e:
                    ok, reason = False, str(e)
            if self.dist.all_ok(ok):
                return folder
            if self.dist.rank == 0:
                warnings.warn(f"skipping checkpoint {folder}: {reason}", stacklevel=2)
        return None

    @staticmethod
    def load(folder: Path, state: dict[str, Any]) -> None:
        """Collective: fill `state` (pre-allocated, any layout) from the checkpoint in place."""
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=str(folder))
