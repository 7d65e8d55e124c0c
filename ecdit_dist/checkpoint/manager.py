"""Training checkpoints: written under a temporary name, committed by a manifest and a rename.

Layout of `<run.dir>/checkpoints/`:

    step-00000042/        a committed checkpoint
        .metadata, *.distcp   torch.distributed.checkpoint (DCP) files, any layout
        meta.json             step, resolved config, data position, layout it was saved on
        manifest.json         every other file with its size and sha256; written last
    latest                the name of the newest committed checkpoint (moved only after commit)
    .tmp-step-00000050/   a checkpoint being written; never loaded

A checkpoint without a manifest, or whose files differ from it, is skipped on resume
with a warning that names it. With ECDIT_CHECKPOINT_KEY set, manifests are signed when
written and an unsigned or wrongly signed one is refused wherever it is read (signing.py).
Retention keeps the newest `keep_last`, every `keep_every`-th step and the newest healthy
one (saved after a finite step). With a mirror, `.mirror-pending.json` lists the committed
steps whose upload has not finished; the next save or resume uploads them first.

Work is spread over the ranks: each rank fsyncs, hashes, verifies and uploads the DCP files
it wrote (`__R_*.distcp`), rank 0 the rest; the digests are gathered and rank 0 commits.
Every phase ends in an agreement (`Dist.agree`), so a failure on any rank is the same
CheckpointError on every rank, naming the failing rank and the cause. The step list that
collective loops run over is rank 0's, broadcast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

from ecdit_dist.checkpoint import signing
from ecdit_dist.checkpoint.collective import Dist, failure_types
from ecdit_dist.checkpoint.errors import CheckpointError
from ecdit_dist.checkpoint.signing import SignatureError

STEP_DIR = re.compile(r"^step-(\d{8,})$")
RANK_FILE = re.compile(r"^__(\d+)_")
MANIFEST = "manifest.json"
META = "meta.json"
OWNER = "owner.json"
MIRROR_PENDING = ".mirror-pending.json"     # committed steps whose mirror upload has not finished

__all__ = ["CheckpointError", "CheckpointManager", "Dist", "verify_checkpoint", "read_meta", "write_manifest"]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    m = STEP_DIR.match(name)
    return int(m.group(1)) if m else None


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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def owner_rank(name: str, world: int) -> int:
    """The rank that fsyncs, hashes, verifies and uploads a checkpoint file: DCP's `__R_i.distcp`
    files belong to the rank R that wrote them (modulo the current world), the rest to rank 0."""
    m = RANK_FILE.match(Path(name).name)
    return int(m.group(1)) % world if m else 0


def digest_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """fsync and hash the named files of `folder`: {name: {size, sha256}}."""
    out = {}
    for name in names:
        p = folder / name
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        out[name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def write_manifest(folder: Path, digests: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """manifest.json of `folder` from the given digests (default: hash every file here); signed
    when ECDIT_CHECKPOINT_KEY is set."""
    if digests is None:
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MANIFEST]
        digests = digest_files(folder, names)
    manifest = signing.sign({"format": 1, "files": dict(sorted(digests.items()))})
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


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a committed checkpoint; with a key set, only a correctly signed one."""
    mpath = Path(folder) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except Exception:
        raise CheckpointError(f"{folder}: {MANIFEST} is unreadable") from None
    if ".metadata" not in files or META not in files:
        raise CheckpointError(f"{folder}: manifest lists no DCP .metadata or {META}")
    signing.check(manifest, str(folder))
    return manifest


def verify_checkpoint(folder: Path, full: bool = True, only: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Check a committed checkpoint against its manifest; raise CheckpointError naming the problem.
    `only(name)` limits the check to some files (each rank checks its own share)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = _safe_member(folder, name)
        if only is not None and not only(name):
            continue
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{folder}: {name} has {size} bytes, manifest says {entry.get('size')}")
        if full and sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest")
    return manifest


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: {META} is unreadable ({e})") from None


def retained(steps: list[int], keep_last: int, keep_every: int, healthy: Callable[[int], bool]) -> set[int]:
    """The steps retention keeps: the newest keep_last, every keep_every-th, and the newest healthy
    one (so newer checkpoints saved while the loss was non-finite never push out the last good one)."""
    steps = sorted(steps)
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for s in reversed(steps):
        if healthy(s):
            keep.add(s)
            break
    return keep


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 3, keep_every: int = 0, dist: Dist | None = None,
                 mirror: str | None = None, async_dist: Dist | None = None, mirror_required: bool = True,
                 mirror_claim: bool = False, retries: int = 5) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.dist = dist or Dist()
        self.async_dist = async_dist or self.dist    # carries only the background save's collectives
        self.mirror = mirror.rstrip("/") + "/checkpoints" if mirror else None
        self.mirror_required = mirror_required
        self.mirror_claim = mirror_claim
        self.retries = retries
        self.run_id: str | None = None               # owner of the mirror prefix; set on save/resume
        self.s3_page_size = 1000                     # objects per listing page of the mirror
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], async_save: bool = False) -> Path:
        """Collective: every rank passes its state; the commit is agreed. Returns the (future) committed folder.

        With `async_save` the call returns once the state is copied to host memory; the files are
        written and committed in the background on a process group of their own, and the next save
        (or `wait()`) waits for that and raises its error, on every rank.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        self.wait()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()

        self.dist.agree(f"preparing {tmp}", prepare, on=0)
        meta = {**meta, "run_id": self.ensure_run_id()}
        d = self.async_dist if async_save else self.dist
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            try:
                if not async_save:
                    dcp.save(state, storage_writer=FileSystemWriter(str(tmp)), process_group=d.group)
                else:
                    future = dcp.async_save(state, storage_writer=FileSystemWriter(str(tmp)), process_group=d.group)
            except failure_types() as e:      # DCP raises the same CheckpointException on every rank
                raise CheckpointError(f"writing checkpoint step {step} to {tmp} failed: {_short(e)}") from e
        if not async_save:
            self._commit(d, step, meta, tmp, final)
            return final

        def finish() -> None:   # background: the write completes, then the commit is agreed
            try:
                try:
                    future.result()
                except failure_types() as e:
                    raise CheckpointError(f"writing checkpoint step {step} to {tmp} failed: {_short(e)}") from e
                self._commit(d, step, meta, tmp, final)
            except BaseException as e:  # reported by wait(), on every rank
                self._error = e

        self._error = None
        self._pending = threading.Thread(target=finish, name=f"checkpoint-{step}", daemon=False)
        self._pending.start()
        return final

    def wait(self) -> None:
        """Block until a background save has been written and committed (collective); its error,
        if any, is raised on every rank."""
        pending = self._pending
        if pending is None:
            return
        pending.join()
        self._pending = None
        error, self._error = self._error, None

        def check() -> None:
            if error is not None:
                raise error

        self.dist.agree("the background checkpoint save", check)

    def _commit(self, d: Dist, step: int, meta: dict[str, Any], tmp: Path, final: Path) -> None:
        """Each rank fsyncs and hashes its own files; rank 0 writes meta.json and the manifest,
        renames, moves `latest` and applies retention; then the mirror upload, spread the same way."""
        def my_digests() -> dict[str, dict[str, Any]]:
            names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                           if p.is_file() and p.name not in (MANIFEST, META))
            return digest_files(tmp, [n for n in names if owner_rank(n, d.world) == d.rank])

        mine = d.agree(f"hashing checkpoint step {step}", my_digests)
        digests: dict[str, dict[str, Any]] = {}
        for part in d.gather(mine):
            digests.update(part)

        def commit() -> None:
            atomic_write_text(tmp / META, json.dumps({**meta, "step": step}, indent=1, sort_keys=True))
            digests.update(digest_files(tmp, [META]))
            write_manifest(tmp, digests)
            if final.exists():       # re-saving a step (e.g. after a resume): keep the newer copy
                old = self.root / f".old-{step_dir_name(step)}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / "latest", final.name + "\n")
            if self.mirror:         # until its upload finishes, a later process finishes it
                self._set_pending(self._pending_mirror() | {final.name})
            self._retain()

        d.agree(f"committing checkpoint step {step}", commit, on=0)
        if self.mirror:
            self.resume_mirror_uploads(d)

    def _healthy(self, folder: Path) -> bool:
        try:
            return read_meta(folder).get("healthy", True) is not False
        except CheckpointError:
            return False

    def _retain(self) -> None:
        steps = self.committed_steps()
        keep = retained(steps, self.keep_last, self.keep_every, lambda s: self._healthy(self.root / step_dir_name(s)))
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.root / step_dir_name(s), ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ run identity (mirror ownership)
    def ensure_run_id(self) -> str:
        """This run's id: the one of the checkpoint it resumed from, else a new one (rank 0's, broadcast)."""
        if self.run_id is None:
            self.run_id = self.dist.broadcast(uuid.uuid4().hex)
        return self.run_id

    # ------------------------------------------------------------------ object-storage mirror
    def _s3(self):
        from ecdit_dist.data.storage import S3Storage

        return S3Storage(retries=self.retries, page_size=self.s3_page_size)

    def check_mirror_owner(self) -> None:
        """Collective: refuse a mirror prefix that holds another run's checkpoints (unless
        `checkpoint.mirror_claim`); claim a free one."""
        if not self.mirror:
            return
        run_id = self.ensure_run_id()

        def check() -> None:
            from ecdit_dist.data.storage import DataError

            s3 = self._s3()
            try:
                owner = json.loads(s3.read_bytes(f"{self.mirror}/{OWNER}")).get("run_id")
            except DataError as e:
                if "not found" not in str(e) or "bucket not found" in str(e):
                    raise
                owner = None
            if owner not in (None, run_id) and not self.mirror_claim:
                raise CheckpointError(
                    f"{self.mirror} belongs to another run (run id {owner}; this run is {run_id}); use another "
                    f"checkpoint.mirror prefix, or set checkpoint.mirror_claim=true to take it over")
            if owner != run_id:
                s3.put_bytes(f"{self.mirror}/{OWNER}", json.dumps({"run_id": run_id}).encode())

        try:
            self.dist.agree(f"checking the owner of {self.mirror}", check, on=0)
        except CheckpointError as e:
            if self.mirror_required or "belongs to another run" in str(e):
                raise
            if self.dist.rank == 0:
                warnings.warn(f"the mirror is unreachable, training goes on (checkpoint.mirror_required=false): {e}",
                              stacklevel=2)
            return
        self.resume_mirror_uploads()        # what an earlier process of this run left unfinished

    def _pending_mirror(self) -> set[str]:
        try:
            names = json.loads((self.root / MIRROR_PENDING).read_text())
        except (OSError, ValueError):
            return set()
        return {n for n in names if isinstance(n, str) and step_of(n) is not None}

    def _set_pending(self, names: set[str]) -> None:
        if names:
            atomic_write_text(self.root / MIRROR_PENDING, json.dumps(sorted(names)))
        else:
            (self.root / MIRROR_PENDING).unlink(missing_ok=True)

    def resume_mirror_uploads(self, d: Dist | None = None) -> None:
        """Collective: upload the committed checkpoints whose mirror upload has not finished, oldest
        first (this process's newest commit, or those a killed or failed earlier process left; an
        interrupted multipart upload resumes with the parts the server is missing)."""
        if not self.mirror:
            return
        d = d or self.dist
        pending = d.broadcast(sorted(self._pending_mirror(), key=step_of) if d.rank == 0 else None)
        for name in pending:
            folder = self.root / name
            if not d.all_ok(folder.is_dir() and (folder / MANIFEST).is_file()):
                if d.rank == 0:
                    warnings.warn(f"{folder} was never fully uploaded to {self.mirror} and is gone from this "
                                  f"machine; the mirror does not have it", stacklevel=2)
                    self._set_pending(self._pending_mirror() - {name})
                continue
            if not self._mirror_upload(d, folder):
                return                  # the mirror is failing (and not required): try again at the next save

    def _mirror_upload(self, d: Dist, folder: Path) -> bool:
        """Copy a committed checkpoint to the mirror: each rank uploads its own files (checksums
        verified by the server), then rank 0 the manifest and `latest`, then retention on the
        remote listing. With checkpoint.mirror_required=false a failure is a warning (False)."""
        manifest = read_manifest(folder)
        remote = f"{self.mirror}/{folder.name}"

        def upload_mine() -> None:
            s3 = self._s3()
            for name, entry in manifest["files"].items():
                if owner_rank(name, d.world) == d.rank:
                    s3.put_file(folder / name, f"{remote}/{name}", entry["sha256"])

        def publish() -> None:
            s3 = self._s3()
            s3.put_file(folder / MANIFEST, f"{remote}/{MANIFEST}")
            try:                        # `latest` never goes back to an older step uploaded late
                newest = step_of(s3.read_bytes(f"{self.mirror}/latest").decode().strip())
            except Exception:
                newest = None
            if newest is None or newest <= step_of(folder.name):
                s3.put_bytes(f"{self.mirror}/latest", (folder.name + "\n").encode())
            self._set_pending(self._pending_mirror() - {folder.name})
            self._retain_remote(s3)

        try:
            d.agree(f"uploading {folder.name} to {remote}", upload_mine)
            d.agree(f"publishing {folder.name} on {self.mirror}", publish, on=0)
            return True
        except CheckpointError as e:
            if self.mirror_required:
                raise CheckpointError(f"{e} (set checkpoint.mirror_required=false to keep training when the "
                                      f"mirror fails; the upload resumes at the next save or resume)") from e
            if d.rank == 0:
                warnings.warn(f"mirror upload failed, training goes on (checkpoint.mirror_required=false; the "
                              f"upload resumes at the next save or resume): {e}", stacklevel=2)
            return False

    def remote_steps(self, s3) -> dict[int, list[str]]:
        """Steps on the mirror -> their object paths (every page of the listing)."""
        out: dict[int, list[str]] = {}
        for obj in s3.list(self.mirror + "/"):
            step = step_of(obj.path[len(self.mirror) + 1:].split("/", 1)[0])
            if step is not None:
                out.setdefault(step, []).append(obj.path)
        return out

    def _retain_remote(self, s3) -> None:
        """Retention on the remote listing (not on this machine's folder): milestones and the newest
        healthy checkpoint stay whatever happened to the local disk."""
        listing = self.remote_steps(s3)
        committed = [s for s, paths in listing.items() if any(p.endswith("/" + MANIFEST) for p in paths)]

        def healthy(step: int) -> bool:
            try:
                return json.loads(s3.read_bytes(f"{self.mirror}/{step_dir_name(step)}/{META}")).get("healthy", True) \
                    is not False
            except Exception:
                return False

        keep = retained(committed, self.keep_last, self.keep_every, healthy)
        for step, paths in listing.items():
            if step in committed and step not in keep:
                # the manifest first: a half-deleted step is never taken for a committed one
                for path in sorted(paths, key=lambda p: not p.endswith("/" + MANIFEST)):
                    s3.delete(path)

    def fetch_from_mirror(self, full_verify: bool = True) -> Path | None:
        """Collective: download the newest mirrored checkpoint whose manifest verifies into run.dir;
        each rank downloads and verifies its own share of the files."""
        from ecdit_dist.data.storage import DataError

        d = self.dist

        def listing() -> list[int]:
            return sorted(self.remote_steps(self._s3()), reverse=True)

        steps = d.broadcast(d.agree(f"listing {self.mirror}", listing, on=0))
        for step in steps:
            name = step_dir_name(step)
            remote = f"{self.mirror}/{name}"
            tmp = self.root / f".fetch-{name}"

            def get_manifest() -> dict[str, Any] | None:
                try:
                    manifest = json.loads(self._s3().read_bytes(f"{remote}/{MANIFEST}"))
                    assert isinstance(manifest["files"], dict)
                    signing.check(manifest, remote)
                    for file in manifest["files"]:
                        _safe_member(tmp, file)
                except SignatureError:
                    raise               # refused, never skipped in favour of an older one
                except (DataError, CheckpointError, ValueError, KeyError, AssertionError, TypeError) as e:
                    warnings.warn(f"skipping mirrored checkpoint {remote}: {e}", stacklevel=3)
                    return None
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                return manifest

            manifest = d.broadcast(d.agree(f"reading {remote}/{MANIFEST}", get_manifest, on=0))
            if manifest is None:
                continue

            def download_mine() -> bool:
                s3 = self._s3()
                mine = lambda n: owner_rank(n, d.world) == d.rank   # noqa: E731
                try:
                    for file in filter(mine, manifest["files"]):
                        target = _safe_member(tmp, file)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        s3.get_file(f"{remote}/{file}", target)
                    if d.rank == 0:
                        atomic_write_text(tmp / MANIFEST, json.dumps(manifest))
                    d_ok = True
                except DataError as e:
                    warnings.warn(f"skipping mirrored checkpoint {remote}: {e}", stacklevel=3)
                    d_ok = False
                return d_ok

            ok = d.all_ok(d.agree(f"downloading {remote}", download_mine))
            if ok:
                ok = d.all_ok(self._verify_share(tmp, full_verify))
            if not ok:
                if d.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                continue
            final = self.root / name

            def install() -> None:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                atomic_write_text(self.root / "latest", name + "\n")

            d.agree(f"installing {name} from {self.mirror}", install, on=0)
            return final
        return None

    # ------------------------------------------------------------------ find / load
    def committed_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(s for p in self.root.iterdir() if (s := step_of(p.name)) is not None and p.is_dir())

    def _verify_share(self, folder: Path, full: bool) -> bool:
        """This rank verifies its own files of `folder` (rank 0 also the manifest); warns on failure.
        A refused signature is raised: a tampered or foreign checkpoint stops the run, whatever is older."""
        d = self.dist
        try:
            verify_checkpoint(folder, full=full, only=lambda n: owner_rank(n, d.world) == d.rank)
            return True
        except SignatureError:
            raise
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {folder}: {e} (found by rank {d.rank})", stacklevel=3)
            return False

    def latest_valid(self, full_verify: bool = True) -> Path | None:
        """Collective: the newest checkpoint that passes verification (every rank checks its own
        files); broken ones are reported and skipped. The step list is rank 0's."""
        steps = self.dist.broadcast(self.committed_steps())
        for step in reversed(steps):
            folder = self.root / step_dir_name(step)
            ok = self.dist.agree(f"verifying {folder}", lambda: self._verify_share(folder, full_verify))
            if self.dist.all_ok(ok):
                return folder
        return None

    def check_shared_filesystem(self) -> None:
        """Collective: every rank sees the files rank 0 writes under run.dir (the manager needs one
        filesystem shared by all ranks); a clear error naming the ranks that do not."""
        d = self.dist
        if d.world == 1:
            return
        probe = self.root.parent / f".shared-check-{d.broadcast(uuid.uuid4().hex)}"
        d.agree(f"writing {probe}", lambda: (probe.parent.mkdir(parents=True, exist_ok=True),
                                            probe.write_text("shared")), on=0)
        sees = probe.is_file()
        seen = d.gather(sees)
        if d.rank == 0:
            probe.unlink(missing_ok=True)
        blind = [r for r, ok in enumerate(seen) if not ok]
        if blind:
            raise CheckpointError(
                f"run.dir {self.root.parent} is not one filesystem shared by all ranks: rank(s) "
                f"{', '.join(map(str, blind))} cannot see a file rank 0 wrote there. Put run.dir on a "
                f"filesystem every node mounts (NFS, Lustre, GPFS, ...)")

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        """Collective: fill `state` (pre-allocated, any layout) from the checkpoint in place, reading
        data only (no code from the checkpoint runs; see safe_load)."""
        from ecdit_dist.checkpoint import safe_load

        safe_load.load(state, folder, process_group=self.dist.group)


def _short(e: BaseException) -> str:
    """DCP wraps per-rank failures in CheckpointException; name the ranks and the causes."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for r, wrapped in sorted(failures.items()):
            err = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            parts.append(f"rank {r}: {type(err).__name__}: {err}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"
