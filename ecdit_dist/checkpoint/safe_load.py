"""Reading DCP checkpoints without running code from them.

A DCP checkpoint's `.metadata` is a pickle, and DCP's default planner reads every non-tensor
item (e.g. optimizer hyperparameters) with `torch.load(weights_only=False)`: both would run
whatever a tampered file asks for. Here `.metadata` is read by an unpickler that admits only
the classes DCP metadata is made of (its dataclasses and enums, torch.Size, dtypes, layouts,
paths) and plain containers, and refuses anything else naming it; non-tensor items are read
with `torch.load(weights_only=True)`. Every DCP read in this project goes through `load` and
`read_metadata` below.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ecdit_dist.checkpoint.errors import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks for code or objects that a checkpoint never holds."""


_CONTAINERS = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "bool",
                                           "str", "bytes", "bytearray", "complex")}
_CONTAINERS |= {("collections", "OrderedDict"), ("collections", "defaultdict")}
_PATHS = {("pathlib", n) for n in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")}
_TORCH = {("torch", "Size"), ("torch.serialization", "_get_layout")}
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")


def _admitted(module: str, name: str) -> Any | None:
    """The object for (module, name) when a DCP metadata pickle may refer to it, else None."""
    if (module, name) in _CONTAINERS | _PATHS | _TORCH:
        return pickle.Unpickler.find_class(_Reader.__new__(_Reader), module, name)
    if module == "torch" and "." not in name:
        obj = getattr(torch, name, None)
        return obj if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    if module in _DCP_MODULES and "." not in name:
        import importlib

        obj = getattr(importlib.import_module(module), name, None)
        # only plain data classes and enums: their construction runs no code of the file's choosing
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
    return None


class _Reader(pickle.Unpickler):
    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = _admitted(module, name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self.source} refers to {module}.{name}, which DCP checkpoint metadata never holds; "
                f"refusing to read it (the file was tampered with or is not a checkpoint). Nothing was run.")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source} uses pickle persistent ids, which DCP metadata never does")


def loads_metadata(data: bytes, source: str) -> Any:
    """Unpickle DCP metadata bytes with the restricted reader."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = _Reader(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{source} is not readable DCP metadata: {type(e).__name__}: {e}") from None
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"{source} holds a {type(md).__name__}, not DCP Metadata")
    return md


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose `.metadata` goes through the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                md = loads_metadata(f.read(), str(path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner that reads non-tensor items with torch.load(weights_only=True)."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"checkpoint item {read_item.dest_index.fqn} is not plain data "
                                            f"(refused by torch.load(weights_only=True)): {e}") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyLoadPlanner()


_checked: dict[str, tuple] = {}


def check_signed(folder: str | Path) -> None:
    """With ECDIT_CHECKPOINT_KEY set: the folder's manifest must be signed with that key and its
    `.metadata` must be the one the manifest names (also when the sha256 check of every file is
    skipped), before anything of the checkpoint is read. Without the key: nothing."""
    from ecdit_dist.checkpoint import signing

    if signing.key() is None:
        return
    import hashlib

    from ecdit_dist.checkpoint.manager import read_manifest

    folder = Path(folder)
    try:
        stamp = tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in
                      ((folder / n).stat() for n in ("manifest.json", ".metadata"))) + (signing.key_id(signing.key()),)
    except OSError:
        stamp = None
    if stamp is not None and _checked.get(str(folder)) == stamp:
        return                      # the same files, already checked with the same key (one tensor at a time)
    entry = read_manifest(folder)["files"][".metadata"]      # refuses an unsigned or wrongly signed manifest
    data = (folder / ".metadata").read_bytes()
    if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise signing.SignatureError(f"{folder}: .metadata is not the file the signed manifest names (tampered "
                                     f"with); do not use this checkpoint")
    if stamp is not None:
        _checked[str(folder)] = stamp


def read_metadata(folder: str | Path, signed: bool = True):
    """The DCP Metadata of a checkpoint folder, read safely; with a key set, the manifest's signature
    is checked first (`signed=False`: a scratch folder this process has just written, with no manifest)."""
    if signed:
        check_signed(folder)
    return _reader_class()(str(folder)).read_metadata()


def load(state: dict[str, Any], folder: str | Path, process_group=None) -> None:
    """dcp.load into `state` in place, reading only data (collective over `process_group` when
    torch.distributed is initialised)."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    read_metadata(folder)     # refuse a tampered file here, before DCP (which logs its failures at length)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state, storage_reader=_reader_class()(str(folder)), planner=_planner(),
                     process_group=process_group)
        except CheckpointException as e:     # per-rank failures, gathered by DCP: name them
            causes = [w[0] if isinstance(w, tuple) else w for _, w in sorted(e.failures.items())]
            unsafe = next((c for c in causes if isinstance(c, UnsafeCheckpointError)), None)
            if unsafe is not None:
                raise UnsafeCheckpointError(str(unsafe)) from None
            where = "; ".join(f"rank {r}: {type(c).__name__}: {c}" for r, c in zip(sorted(e.failures), causes))
            raise CheckpointError(f"loading {folder} failed ({where})") from None
